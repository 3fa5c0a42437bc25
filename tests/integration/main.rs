//! One integration-test binary made of topic modules; each starts the real proxy on
//! 127.0.0.1:0 in front of a real backend and talks to it with real clients.

mod util;

mod cdp;
#[allow(dead_code)]
#[path = "../../examples/storm/backend.rs"]
mod storm_backend;

mod admin;
mod backoff;
mod census;
mod cli;
mod console;
mod edge;
mod etcd;
mod fast_path;
mod fleet;
mod http_proxy;
mod integrity;
mod kill_cli;
mod killswitch;
mod limits;
mod preview;
mod protocol_edges;
mod reload;
mod semver_oracle;
mod state_faults;
mod tls;
mod versions;
mod websocket;
mod ws_close;
