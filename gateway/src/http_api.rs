//! The HTTP routes: publish (single and batch), health, readiness, metrics.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::node::Node;
use crate::protocol::{ErrorCode, ProtocolError, http_error_body};

/// The response body type of every route.
pub type Body = Full<Bytes>;

/// A request refused early, with the response that says why.
type Refusal = Box<Response<Body>>;

/// A JSON response.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
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

fn authorize(node: &Node, req: &Request<Incoming>) -> Result<(), Refusal> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    node.access
        .check_api_key(auth)
        .map_err(|d| Box::new(error(StatusCode::UNAUTHORIZED, ErrorCode::Forbidden, d.0)))
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
    if let Err(r) = authorize(node, &req) {
        return *r;
    }
    if let Err(e) = check_topic(topic) {
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
    let data = match check_json(&body) {
        Ok(raw) => Bytes::copy_from_slice(raw.get().as_bytes()),
        Err(e) => return protocol_error(e),
    };
    match node.publish(topic, data, "http").await {
        Ok(pos) => json(
            StatusCode::OK,
            serde_json::json!({"epoch": pos.epoch.as_str(), "offset": pos.offset}).to_string(),
        ),
        Err(e) => protocol_error(e),
    }
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
    if let Err(r) = authorize(node, &req) {
        return *r;
    }
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
        ErrorCode::BadRequest,
        "method not allowed",
    )
}

/// 404 with a JSON body.
pub fn not_found() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::BadRequest,
        "no such route",
    )
}
