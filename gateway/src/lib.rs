//! pubgate's gateway: WebSocket sessions, the local topic registry, fan-out, the HTTP API,
//! metrics and configuration. The `pubgate` binary only parses flags and calls [`server::run`].

pub mod auth;
pub mod config;
pub mod drain;
pub mod frame;
pub mod frame_read;
pub mod http_api;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod registry;
pub mod send_queue;
pub mod server;
pub mod session;
pub mod subscribe;
pub mod tcp;
pub mod tls;
pub mod topic;
pub mod writer;
pub mod ws_read;

pub mod logging;
