//! Topic names and patterns: `validate`, `Pattern::parse`, `matches` on any input.
#![no_main]

use gateway::topic::{self, Pattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: a pattern; the rest: a topic.
    let (pattern, name) = text.split_once('\n').unwrap_or((text, text));
    let valid = topic::validate(name).is_ok();
    if valid {
        assert!(!name.is_empty() && name.len() <= topic::MAX_TOPIC_LEN);
        // A valid topic is a pattern that matches itself; `>` matches every topic.
        assert!(
            Pattern::parse(name)
                .expect("topic is a pattern")
                .matches(name)
        );
        assert!(Pattern::parse(">").unwrap().matches(name));
    }
    if let Ok(p) = Pattern::parse(pattern) {
        let _ = p.matches(name);
        let _ = topic::any_matches(&[p], name);
    }
});
