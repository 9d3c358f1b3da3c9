//! The HTTP routes: publish (single and batch), history, health, readiness, metrics.

use broker_bridge::{HistoryRead, Replay};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Denied, Identity};
use crate::node::Node;
use crate::protocol::{ErrorCode, ProtocolError, http_error_body};

/// The response body type of every route.
pub type Body = Full<Bytes>;

/// A request refused early, with the response that says why.
type Refusal = Box<Response<Body>>;

/// A JSON response. The body ends in a newline, so `curl -s` leaves the shell prompt on a line of
/// its own.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body: Bytes = body.into();
    let mut text = Vec::with_capacity(body.len() + 1);
    text.extend_from_slice(&body);
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON error response with the protocol's error code.
pub fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        http_error_body(&ProtocolError::new(code, message.into())),
    )
}

fn protocol_error(e: ProtocolError) -> Response<Body> {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, http_error_body(&e))
}

/// The live page and the JavaScript client, embedded in the binary: (path, content type, body).
const PAGE_ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("page/index.html"),
    ),
    (
        "/_pubgate/page.css",
        "text/css; charset=utf-8",
        include_str!("page/page.css"),
    ),
    (
        "/_pubgate/page.js",
        "text/javascript; charset=utf-8",
        include_str!("page/page.js"),
    ),
    (
        "/_pubgate/pubgate.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/pubgate.js"),
    ),
    (
        "/_pubgate/pubgate-util.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/pubgate-util.js"),
    ),
    (
        "/_pubgate/pubgate-shared.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/pubgate-shared.js"),
    ),
    (
        "/_pubgate/pubgate-worker.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/pubgate-worker.js"),
    ),
];

/// `GET /` and `GET /_pubgate/…`: the live page (when `server.page` is on).
pub fn page_asset(path: &str, method: &Method) -> Response<Body> {
    let Some((_, content_type, body)) = PAGE_ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return not_found();
    };
    if method != Method::GET && method != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest,
            "the page takes GET only",
        );
    }
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /healthz`: the process is alive.
pub fn healthz() -> Response<Body> {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// `GET /readyz`: 200 while the node takes traffic, 503 while draining or the broker is down.
pub fn readyz(node: &Node) -> Response<Body> {
    let ready = node.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "draining": node.is_draining(),
        "broker": node.broker.is_ready(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string())
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(node: &Node) -> Response<Body> {
    node.is_ready(); // refreshes pubgate_broker_up
    let mut r = Response::new(Full::new(Bytes::from(node.metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, Refusal> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MessageTooLarge,
            format!("body larger than {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Box::new(too_large()));
    }
    // The whole body must arrive within the handshake timeout, so a client that sends part of a body
    // and stops cannot hold the connection forever.
    let collect = Limited::new(req.into_body(), limit).collect();
    let Ok(collected) = tokio::time::timeout(timeout, collect).await else {
        return Err(Box::new(error(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::BadRequest,
            format!("body not received within {timeout:?}"),
        )));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(too_large())),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("could not read body: {e}"),
        ))),
    }
}

/// Who sent a publish (an API key or a JWT), or its 401.
async fn authorize(node: &Node, req: &Request<Incoming>) -> Result<Identity, Refusal> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    node.access
        .with_fresh_keys(|| node.access.identify_publisher(auth))
        .await
        .map_err(|d| Box::new(unauthorized(node, &d)))
}

/// 401 for a missing or refused credential; why a token failed is logged, not told.
pub fn unauthorized(node: &Node, denied: &Denied) -> Response<Body> {
    if let Some(e) = &denied.token {
        node.metrics
            .token_rejections
            .with_label_values(&[e.label()])
            .inc();
        tracing::debug!(reason = %e, "token refused");
    }
    error(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden,
        denied.message,
    )
}

/// A topic the caller may not use: 403 when its credential does not cover it; 401 for an anonymous
/// caller on a node that takes credentials (one could cover it), with the same body as any refused
/// credential.
fn forbidden(node: &Node, who: &Identity, what: &str, topic: &str) -> Response<Body> {
    if matches!(who, Identity::Anonymous) && node.access.takes_credentials() {
        return error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden,
            "missing or invalid credentials",
        );
    }
    error(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!("not allowed to {what} {topic}"),
    )
}

fn check_topic(topic: &str) -> Result<(), ProtocolError> {
    crate::topic::validate(topic)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidTopic, format!("{topic:?}: {e}")))
}

fn check_json(body: &[u8]) -> Result<&RawValue, ProtocolError> {
    serde_json::from_slice::<&RawValue>(body).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadRequest,
            format!("body is not a JSON value: {e}"),
        )
    })
}

/// `POST /v1/publish/{topic}`: the body is the message's JSON `data`.
pub async fn publish_one(node: &Node, topic: &str, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return method_not_allowed();
    }
    let who = match authorize(node, &req).await {
        Ok(who) => who,
        Err(r) => return *r,
    };
    if let Err(e) = check_topic(topic) {
        return protocol_error(e);
    }
    if !node.access.may_publish(&who, topic) {
        return forbidden(node, &who, "publish to", topic);
    }
    if let Err(e) = node.check_namespace(&who, topic, 0) {
        return protocol_error(e);
    }
    let body = match read_body(
        req,
        node.settings.limits.max_message_size,
        node.settings.server.handshake_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let max_depth = node.settings.limits.max_json_depth;
    let data = match check_json(&body).and_then(|raw| {
        crate::json_depth::check(raw.get().as_bytes(), max_depth)?;
        Ok(raw)
    }) {
        Ok(raw) => Bytes::copy_from_slice(raw.get().as_bytes()),
        Err(e) => return protocol_error(e),
    };
    if let Err(e) = node.check_namespace(&who, topic, data.len()) {
        return protocol_error(e);
    }
    match node.publish(topic, data, "http").await {
        Ok(pos) => json(
            StatusCode::OK,
            serde_json::json!({"epoch": pos.epoch.as_str(), "offset": pos.offset}).to_string(),
        ),
        Err(e) => protocol_error(e),
    }
}

/// Messages one `GET /v1/history` page returns when `limit` is not given.
const HISTORY_DEFAULT_LIMIT: usize = 100;
/// The largest `limit` of `GET /v1/history`.
const HISTORY_MAX_LIMIT: usize = 1000;

/// The query of `GET /v1/history/{topic}`.
struct HistoryQuery<'a> {
    since: Option<u64>,
    epoch: Option<&'a str>,
    limit: usize,
}

fn history_query(query: Option<&str>) -> Result<HistoryQuery<'_>, ProtocolError> {
    let bad = |m: String| ProtocolError::new(ErrorCode::BadRequest, m);
    let mut q = HistoryQuery {
        since: None,
        epoch: None,
        limit: HISTORY_DEFAULT_LIMIT,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "since" => {
                // Clamped like a resume's offset (see `parse_offset`).
                q.since = Some(crate::protocol::parse_offset(value).ok_or_else(|| {
                    bad(format!(
                        "since must be an offset (a non-negative integer), got {value:?}"
                    ))
                })?)
            }
            "epoch" => {
                // Epochs are ASCII letters and digits, so they never need percent-decoding.
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(bad(format!(
                        "epoch must be letters and digits, got {value:?}"
                    )));
                }
                q.epoch = Some(value);
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=HISTORY_MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit must be 1 to {HISTORY_MAX_LIMIT}, got {value:?}"
                        ))
                    })?
            }
            // Unknown parameters are ignored, like unknown fields in client frames.
            _ => {}
        }
    }
    Ok(q)
}

/// `GET /v1/history/{topic}?since=<offset>&epoch=<epoch>&limit=<n>`: the messages after `since`
/// that history still holds (without `since`: the newest `limit`), oldest first, with the topic's
/// position and whether the page reaches back to `since + 1` in that epoch. Who may read is who
/// may subscribe (`Access::may_subscribe`): any topic with an API key, the topics of
/// `auth.anonymous_subscribe` without one. `data` goes out byte for byte as it was published.
pub async fn history(node: &Node, topic: &str, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return method_not_allowed();
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let who = match node
        .access
        .with_fresh_keys(|| node.access.identify_http(auth))
        .await
    {
        Ok(who) => who,
        Err(d) => return unauthorized(node, &d),
    };
    if let Err(e) = check_topic(topic) {
        return protocol_error(e);
    }
    if !node.access.may_subscribe(&who, topic) {
        return forbidden(node, &who, "read", topic);
    }
    let query = match history_query(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return protocol_error(e),
    };
    let read = HistoryRead {
        epoch: query.epoch,
        since: query.since,
        limit: query.limit,
        whole: false,
    };
    let page = match node.history(topic, read).await {
        Ok(page) => page,
        Err(e) => return protocol_error(e),
    };
    json(StatusCode::OK, history_body(topic, &page))
}

/// Writes a history page as JSON by hand, so each `data` is copied as is, never re-serialized.
fn history_body(topic: &str, page: &Replay) -> Vec<u8> {
    use std::io::Write;
    let size: usize = page.messages.iter().map(|m| m.data.len() + 32).sum();
    let mut out = Vec::with_capacity(128 + size);
    // Topic (validated) and epoch (from the broker) are plain strings; serde_json escapes them.
    let _ = write!(
        out,
        r#"{{"topic":{},"epoch":{},"offset":{},"complete":{},"messages":["#,
        serde_json::Value::from(topic),
        serde_json::Value::from(page.position.epoch.as_str()),
        page.position.offset,
        page.complete
    );
    for (i, m) in page.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let offset = m.position.as_ref().map_or(0, |p| p.offset);
        let _ = write!(out, r#"{{"offset":{offset},"data":"#);
        out.extend_from_slice(&m.data);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<BatchItem<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    topic: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /v1/publish`: `{"messages":[{"topic":…,"data":…},…]}`, validated whole before any is
/// published, then published in order.
pub async fn publish_batch(node: &Node, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return method_not_allowed();
    }
    let who = match authorize(node, &req).await {
        Ok(who) => who,
        Err(r) => return *r,
    };
    let limits = &node.settings.limits;
    let body = match read_body(
        req,
        limits.max_batch_bytes,
        node.settings.server.handshake_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let batch: Batch<'_> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("body must be {{\"messages\":[{{\"topic\":…,\"data\":…}}]}}: {e}"),
            );
        }
    };
    if batch.messages.is_empty() || batch.messages.len() > limits.max_batch_messages {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("a batch holds 1 to {} messages", limits.max_batch_messages),
        );
    }
    for (i, m) in batch.messages.iter().enumerate() {
        if let Err(mut e) = check_topic(&m.topic) {
            e.message = format!("messages[{i}]: {}", e.message);
            return protocol_error(e);
        }
        // Checked for every message before any is published: a batch is refused whole.
        if !node.access.may_publish(&who, &m.topic) {
            return forbidden(node, &who, &format!("messages[{i}]: publish to"), &m.topic);
        }
        if let Err(mut e) = crate::json_depth::check(m.data.get().as_bytes(), limits.max_json_depth)
        {
            e.message = format!("messages[{i}]: {}", e.message);
            return protocol_error(e);
        }
        if let Err(mut e) = node.check_namespace(&who, &m.topic, m.data.get().len()) {
            e.message = format!("messages[{i}]: {}", e.message);
            return protocol_error(e);
        }
        if m.data.get().len() > limits.max_message_size {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge,
                format!(
                    "messages[{i}]: data larger than {} bytes",
                    limits.max_message_size
                ),
            );
        }
    }
    let mut results = Vec::with_capacity(batch.messages.len());
    for m in &batch.messages {
        let data = Bytes::copy_from_slice(m.data.get().as_bytes());
        match node.publish(&m.topic, data, "http").await {
            Ok(pos) => results.push(serde_json::json!({
                "topic": m.topic, "epoch": pos.epoch.as_str(), "offset": pos.offset,
            })),
            Err(e) => {
                // Messages before this one are published; say exactly which.
                let status = StatusCode::from_u16(e.code.http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = serde_json::json!({
                    "code": e.code.as_str(), "message": e.message,
                    "published": results.len(), "results": results,
                });
                return json(status, body.to_string());
            }
        }
    }
    json(
        StatusCode::OK,
        serde_json::json!({ "results": results }).to_string(),
    )
}

/// 405 with a JSON body.
pub fn method_not_allowed() -> Response<Body> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "method not allowed",
    )
}

/// 404 with a JSON body.
pub fn not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
}
