//! pubgate's gateway: WebSocket sessions, the local topic registry, fan-out, the HTTP API,
//! metrics and configuration. The `pubgate` binary only parses flags and calls [`server::run`].
//!
//! Only what the binary, the integration tests and the fuzz targets use is public; everything
//! else is `pub(crate)`, so the compiler points out code nothing calls.

pub mod config;
mod error;
pub mod jwt;
pub mod logging;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod topic;
pub mod ws_read;

pub(crate) mod auth;
pub(crate) mod deflate;
pub(crate) mod drain;
pub(crate) mod frame;
pub(crate) mod frame_read;
pub(crate) mod http_api;
pub(crate) mod json_depth;
pub(crate) mod metrics;
pub(crate) mod namespace;
pub(crate) mod node;
pub(crate) mod per_ip;
pub(crate) mod proxy_protocol;
pub(crate) mod registry;
pub(crate) mod send_queue;
pub(crate) mod session;
pub(crate) mod subscribe;
pub(crate) mod tcp;
pub(crate) mod tls_stream;
pub(crate) mod wild_resume;
pub(crate) mod writer;

pub use error::Error;
