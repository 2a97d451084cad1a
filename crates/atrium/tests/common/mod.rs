//! What the binary's end-to-end tests share.
#![allow(dead_code, clippy::unwrap_used)]

/// The `atrium` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_atrium");

/// A loopback port free right now (the process under test binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks a process to stop as Ctrl-C would (SIGTERM), so it stops its own
/// children too.
pub fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
