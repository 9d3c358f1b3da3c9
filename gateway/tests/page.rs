//! The live page and the JavaScript client, embedded in the binary: served at `/` and under
//! `/_pubgate/` with the right content types, and not at all with `server.page = false`.

mod common;
use common::{Server, http_get};

#[tokio::test]
async fn the_page_and_the_client_are_served_from_the_binary() {
    let server = Server::builder().start().await;
    let page = http_get(server.addr, "/").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains("<title>pubgate"), "{}", page.body);
    assert!(page.body.contains("/_pubgate/page.js"));
    for (path, needle) in [
        ("/_pubgate/pubgate.js", "export class PubgateClient"),
        ("/_pubgate/pubgate-util.js", "export class PubgateError"),
        ("/_pubgate/pubgate-shared.js", "export function connect"),
        ("/_pubgate/pubgate-worker.js", "onconnect"),
        ("/_pubgate/page.js", "from '/_pubgate/pubgate.js'"),
    ] {
        let js = http_get(server.addr, path).await;
        assert_eq!(js.status, 200, "{path}: {}", js.body);
        assert_eq!(
            js.header("content-type"),
            Some("text/javascript; charset=utf-8"),
            "{path}"
        );
        assert!(js.body.contains(needle), "{path}");
    }
    let css = http_get(server.addr, "/_pubgate/page.css").await;
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    let missing = http_get(server.addr, "/_pubgate/nope.js").await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn server_page_false_turns_the_page_off() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__PAGE", "false")
        .start()
        .await;
    assert_eq!(http_get(server.addr, "/").await.status, 404);
    assert_eq!(
        http_get(server.addr, "/_pubgate/pubgate.js").await.status,
        404
    );
    assert_eq!(http_get(server.addr, "/healthz").await.status, 200);
}
