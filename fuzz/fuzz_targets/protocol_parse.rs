//! `protocol::parse` on any text frame; error replies must be valid JSON.
#![no_main]

use gateway::protocol::{self, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader hands `parse` only valid UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = protocol::parse(text);
    if let Some(id) = parsed.id {
        assert!(id.get().len() <= 256);
    }
    match &parsed.request {
        Ok(Request::Subscribe { topic, .. } | Request::Unsubscribe { topic }) => {
            assert!(gateway::topic::validate(topic).is_ok());
        }
        Ok(Request::Publish { topic, data }) => {
            assert!(gateway::topic::validate(topic).is_ok());
            assert!(text.contains(data.get()));
        }
        Ok(Request::Ping) => {}
        Err(e) => {
            let frame = protocol::error(parsed.id, e);
            let body = match frame[1] & 0x7f {
                126 => &frame[4..],
                127 => &frame[10..],
                _ => &frame[2..],
            };
            let v: serde_json::Value = serde_json::from_slice(body).expect("error reply is JSON");
            assert_eq!(v["code"], e.code.as_str());
        }
    }
});
