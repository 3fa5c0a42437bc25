//! One integration-test binary made of topic modules; each starts the real proxy on
//! 127.0.0.1:0 in front of a real backend and talks to it with real clients.

mod util;

mod admin;
mod cli;
mod edge;
mod etcd;
mod fast_path;
mod fleet;
mod http_proxy;
mod killswitch;
mod limits;
mod reload;
mod tls;
mod versions;
mod websocket;
