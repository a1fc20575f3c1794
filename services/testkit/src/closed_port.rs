//! A loopback port that refuses every connection for as long as the test holds it.
//!
//! A port that was free a moment ago is not enough: another server in the same test run may
//! be given it later, and a "dead" endpoint that starts answering 404 turns a test about
//! unreachable receivers into a flaky one. A socket bound without `listen` keeps the port
//! reserved while the kernel refuses connections to it.

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

#[derive(Debug)]
pub struct ClosedPort {
    addr: SocketAddr,
    _reservation: Socket,
}

impl ClosedPort {
    pub fn reserve() -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("a loopback address");
        socket.bind(&loopback.into()).expect("bind a loopback port");
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .expect("the bound address");
        Self {
            addr,
            _reservation: socket,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_refused_and_the_port_stays_taken() {
        let closed = ClosedPort::reserve();
        let refused = std::net::TcpStream::connect(("127.0.0.1", closed.port()))
            .expect_err("nothing accepts on a reserved port");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", closed.port())).is_err(),
            "no other server can be given the port"
        );
    }
}
