//! The hub's MQTT packet handling from bytes: framing with the strict fixed-header checks, the
//! CONNECT version check, and for every PUBLISH the device-side validation the hub applies
//! (topic rules, D2C topic, property bag, message id, size) plus the C2D settle-topic parse and
//! the user-name / SAS parsing of a CONNECT. Nothing may panic; every error is a clean `Err`.
#![no_main]

use hubmsg_core::hub::fuzzing::d2c_message;
use hubmsg_core::transport::{self, ConnectRead, PacketReader};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;

/// One runtime for every input: building a runtime per input cost more than the parsing.
static RT: std::sync::LazyLock<tokio::runtime::Runtime> =
    std::sync::LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime"));

fuzz_target!(|data: &[u8]| {
    let _ = transport::connect_version(data);
    RT.block_on(async {
        let mut r = PacketReader::new(data, transport::MAX_PACKET_SIZE);
        r.set_limits(transport::MAX_CONNECT_SIZE, 512);
        match r.next_connect().await {
            Ok(ConnectRead::Connect(c)) => {
                if let Some(login) = &c.login {
                    let _ = hubmsg_core::wire::parse_username(&login.username);
                    if let Ok(t) = hubmsg_core::auth::SasToken::parse(&login.password) {
                        let _ = t.resource_uri();
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        r.set_limits(transport::MAX_PACKET_SIZE, 4096);
        for _ in 0..64 {
            match r.next().await {
                Ok(Some(Packet::Publish(p))) => {
                    let _ = hubmsg_core::wire::check_topic_name(&p.topic);
                    let _ = d2c_message("d1", p);
                }
                Ok(Some(Packet::Subscribe(s))) => {
                    for f in &s.filters {
                        let _ = hubmsg_core::wire::c2d_filter(&f.path);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
});
