//! `hubmsg`: run a hub, manage device identities, send and monitor messages.

fn main() {
    println!("hubmsg");
}
