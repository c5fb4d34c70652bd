//! napi-rs build setup (on Linux: cfgs and rerun lines only).
fn main() {
    napi_build::setup();
}
