//! HTTP clients (hyper 1, keep-alive) and `/metrics` scrapes.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{RECV_TIMEOUT, tcp_connect};

/// A parsed HTTP response (status, lower-cased headers, body).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON {:?}: {e}", self.status, self.body)
        })
    }
}

/// A keep-alive HTTP/1.1 connection (hyper's low-level client), for many requests in a row.
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpClient {
    /// Opens a connection.
    pub async fn connect(addr: SocketAddr) -> HttpClient {
        let stream = tcp_connect(addr).await;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap_or_else(|e| panic!("HTTP handshake with {addr}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        HttpClient {
            sender,
            host: addr.to_string(),
        }
    }

    /// Whether the connection is closed (e.g. the server ended an idle keep-alive connection after
    /// `server.handshake_timeout`); a closed client cannot send requests any more.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends one request and reads the whole response (within [`RECV_TIMEOUT`]).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> HttpResponse {
        let body: Bytes = body.into();
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host);
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("valid request");
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(HttpResponse {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        match tokio::time::timeout(RECV_TIMEOUT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no response within {RECV_TIMEOUT:?}"),
        }
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> HttpResponse {
        self.request("POST", path, &[], body).await
    }

    /// `POST /v1/publish/{topic}` with `data` as the body; asserts 200 and returns
    /// `(epoch, offset)`.
    pub async fn publish(&mut self, topic: &str, data: impl Into<Bytes>) -> (String, u64) {
        let r = self.post(&format!("/v1/publish/{topic}"), data).await;
        assert_eq!(r.status, 200, "publish to {topic}: {}", r.body);
        let v = r.json();
        let epoch = v["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("publish reply without epoch: {v}"))
            .to_string();
        let offset = v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("publish reply without offset: {v}"));
        (epoch, offset)
    }
}

/// One `GET` on a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    HttpClient::connect(addr).await.get(path).await
}

/// One `POST` with a JSON body on a fresh connection.
pub async fn http_post(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> HttpResponse {
    HttpClient::connect(addr).await.post(path, body).await
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// One scrape of `/metrics` (Prometheus text format).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The raw exposition.
    pub text: String,
}

impl Metrics {
    /// The value of one series, written exactly as in the exposition: `pubgate_connections` or
    /// `pubgate_messages_published_total{transport="http"}`. `None` when absent.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.text.lines().find_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    }

    /// Like [`Metrics::get`], panicking when the series is absent.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("metric {series} not found in:\n{}", self.text))
    }

    /// Like [`Metrics::get`], with 0 for an absent series (labelled counters appear on first use).
    pub fn value_or_zero(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }

    /// The sum of every series of the metric `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                (metric == name)
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}
