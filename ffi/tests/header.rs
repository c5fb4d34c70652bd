//! `include/hubmsg.h` is generated from `ffi/src` by cbindgen and committed; this test fails when
//! the committed header drifts from the source. `HUBMSG_BLESS=1` rewrites it.

use std::path::PathBuf;

fn generate() -> String {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn committed_header_matches_the_source() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/hubmsg.h");
    let fresh = generate();
    if std::env::var_os("HUBMSG_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or(committed.lines().count().min(fresh.lines().count()), |i| i)
            + 1;
        panic!(
            "include/hubmsg.h is out of date with ffi/src (first difference at line {line}).\n\
             Regenerate it with: HUBMSG_BLESS=1 cargo test -p hubmsg-ffi --test header"
        );
    }
}

#[test]
fn header_declares_every_export_with_docs() {
    let h = generate();
    for name in ["hubmsg_device_send", "hubmsg_device_recv", "hubmsg_service_events_open", "hubmsg_hub_start", "hubmsg_set_log_callback"] {
        assert!(h.contains(&format!("{name}(")), "{name} missing from the header");
    }
    assert!(h.contains("@param") && h.contains("@return"), "Doxygen tags are carried into the header");
    assert!(h.contains("typedef int32_t hubmsg_result;"));
    assert!(h.contains("#define HUBMSG_EMPTY 1"));
}
