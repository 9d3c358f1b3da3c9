//! Unit tests of the settings: defaults, the example file, layering, and errors that name their key.

use super::*;

fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
    let dir = std::env::temp_dir().join(format!("pubgate-cfg-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let cli = Cli {
        config: Some(path),
        ..Cli::default()
    };
    // Not the test process's environment: only what a test passes.
    let r = Settings::load_with_env(&cli, []);
    std::fs::remove_dir_all(&dir).unwrap();
    r
}

/// Loads the defaults with `vars` as the environment.
fn load_env(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let vars = vars.iter().map(|(k, v)| ((*k).into(), (*v).into()));
    Settings::load_with_env(&Cli::default(), vars.collect::<Vec<_>>())
}

#[test]
fn defaults_load() {
    let s = load_toml("").unwrap();
    assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.broker.kind, BrokerKind::Memory);
    assert_eq!(s.drain.grace, Duration::from_secs(30));
}

#[test]
fn bad_values_name_their_key() {
    let e = load_toml("[server]\nlisten = \"nope\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.listen"), "{e}");
    let e = load_toml("[limits]\nmax_subscriptions = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_subscriptions"), "{e}");
    let e = load_toml("[drain]\ngrace = \"soon\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("drain.grace"), "{e}");
    let e = load_toml("[server]\nlisten_typo = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen_typo"), "{e}");
    let e = load_toml("[limits]\nslow_consumer = \"ignore\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.slow_consumer"), "{e}");
    let e = load_toml("[server]\nmax_connections = -1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.max_connections"), "{e}");
    let e = load_toml("[tls]\nmax_handshakes = 0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("tls.max_handshakes"), "{e}");
    let e = load_toml("[limits]\nsubscribe_rate = 0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.subscribe_rate"), "{e}");
    let e = load_toml("[broker]\nunsubscribe_delay = \"soon\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.unsubscribe_delay"), "{e}");
    let e = load_toml("[broker]\nbacklog_messages = 0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.backlog_messages"), "{e}");
    let e = load_toml("[log]\nlevel = \"verbose\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "config: log.level: must be a level (error, warn, info, debug, trace, off) or a list of \
         target=level, not \"verbose\""
    );
    assert!(load_toml("[log]\nlevel = \"info,gateway=debug\"").is_ok());
}

/// Redis counts TTLs in milliseconds: a shorter one would silently become 0 ("no TTL"), and a
/// topic TTL past what `PEXPIRE` takes made every publish fail (hostile review).
#[test]
fn ttls_are_whole_milliseconds_redis_can_take() {
    for (toml, key) in [
        ("[history]\nttl = \"500us\"", "history.ttl"),
        (
            "[history]\ndirectory_window = \"999us\"",
            "history.directory_window",
        ),
        (
            "[broker]\ntopic_idle_ttl = \"500us\"",
            "broker.topic_idle_ttl",
        ),
        (
            "[broker]\ntopic_idle_ttl = \"300000000y\"",
            "broker.topic_idle_ttl",
        ),
        (
            "[[history.rules]]\npattern = \"a.>\"\nttl = \"1us\"",
            "history.rules[0].ttl",
        ),
    ] {
        let e = load_toml(toml).unwrap_err().to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    for toml in [
        "[history]\nttl = \"1ms\"",
        "[broker]\ntopic_idle_ttl = \"0s\"",
        "[broker]\ntopic_idle_ttl = \"36500d\"",
    ] {
        assert!(load_toml(toml).is_ok(), "{toml}");
    }
}

#[test]
fn the_send_queue_must_hold_one_largest_message_frame() {
    // 65536 + 314 fits exactly; one byte less names both keys.
    let ok = load_toml("[limits]\nsend_queue_bytes = 65850").unwrap();
    assert_eq!(ok.limits.send_queue_bytes, 65536 + MESSAGE_FRAME_OVERHEAD);
    let e = load_toml("[limits]\nsend_queue_bytes = 65849")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("limits.send_queue_bytes") && e.contains("limits.max_message_size"),
        "{e}"
    );
    assert!(e.contains("65850"), "{e}");
}

#[test]
fn redis_kinds_need_a_url() {
    let e = load_toml("[broker]\nkind = \"redis\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.url"), "{e}");
    let e = load_toml("[broker]\nkind = \"redis-cluster\"\nurl = \"\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.url"), "{e}");
    let e = load_toml("[broker]\nkind = \"redis\"\nurl = \"redis+sentinel://h:1\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.url") && e.contains("master"), "{e}");
    let s = load_toml("[broker]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6390\"").unwrap();
    assert_eq!(s.broker.kind, BrokerKind::Redis);
    let s = load_toml(
        "[broker]\nkind = \"redis-cluster\"\nurl = \"redis://127.0.0.1:7000,127.0.0.1:7001\"",
    )
    .unwrap();
    assert_eq!(s.broker.kind, BrokerKind::RedisCluster);
    let e = load_toml("[broker]\ncanary_timeout = \"1s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.canary_timeout"), "{e}");
    let e = load_toml("[broker]\nwatch_lease = \"20s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.watch_lease"), "{e}");
    let e = load_toml("[broker]\nwatch_refresh = \"0s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.watch_refresh"), "{e}");
}

#[test]
fn history_rules_pick_the_first_match_and_inherit_defaults() {
    let s = load_toml(
        r#"
[history]
size = 50
ttl = "2m"

[[history.rules]]
pattern = "chat.>"
size = 100
ttl = "1m"

[[history.rules]]
pattern = "chat.noisy"
size = 1

[[history.rules]]
pattern = "ticks.*"
size = 0

[[history.rules]]
pattern = "scores.*"
ttl = "10m"
"#,
    )
    .unwrap();
    let policy = s.history.policy(&s.namespaces);
    let limits = |size, secs| HistoryLimits {
        size,
        ttl: Duration::from_secs(secs),
    };
    assert_eq!(policy.limits("chat.r1"), limits(100, 60));
    assert_eq!(
        policy.limits("chat.noisy"),
        limits(100, 60),
        "the first matching rule wins"
    );
    assert_eq!(policy.limits("ticks.btc"), limits(0, 120));
    assert_eq!(policy.limits("scores.nba"), limits(50, 600));
    assert_eq!(policy.limits("other"), limits(50, 120));
    assert_eq!(
        load_toml("").unwrap().history.policy(&[]).limits("x").size,
        100
    );
}

#[test]
fn bad_history_rules_name_their_key() {
    let e = load_toml("[[history.rules]]\npattern = \"a.>.b\"\nsize = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("history.rules[0].pattern"), "{e}");
    let e = load_toml(
        "[[history.rules]]\npattern = \"a\"\n[[history.rules]]\npattern = \"b\"\nttl = \"0s\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("history.rules[1].ttl"), "{e}");
    let e = load_toml("[[history.rules]]\npattern = \"a\"\nsize = 2000000")
        .unwrap_err()
        .to_string();
    assert!(e.contains("history.rules[0].size"), "{e}");
    let e = load_toml("[[history.rules]]\npattern = \"a\"\nsise = 2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sise"), "{e}");
    let e = load_toml("[[history.rules]]\nsize = 2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pattern"), "{e}");
    let e = load_toml("[history]\nttl = \"0s\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("history.ttl"), "{e}");
    // Redis takes TTLs in milliseconds: a huge one would fail every publish, so start-up refuses it.
    let e = load_toml("[history]\nttl = \"100000000000y\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("history.ttl") && e.contains("366d"), "{e}");
    let e = load_toml("[[history.rules]]\npattern = \"a\"\nttl = \"400d\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("history.rules[0].ttl"), "{e}");
}

#[test]
fn namespaces_load_and_override_history_by_first_match() {
    let s = load_toml(
        r#"
[history]
size = 50

[[history.rules]]
pattern = "prices.>"
ttl = "2m"

[[namespaces]]
name = "prices"
pattern = "prices.>"
history_size = 1
slow_consumer = "conflate"
conflate_key = "symbol"
client_publish = false
wildcards = false

[[namespaces]]
name = "chat"
pattern = "chat.*"
max_message_size = 1024
slow_consumer = "drop_oldest"
"#,
    )
    .unwrap();
    assert_eq!(s.namespaces.len(), 2);
    assert_eq!(
        s.namespaces[0].slow_consumer,
        Some(NamespacePolicy::Conflate)
    );
    assert!(!s.namespaces[0].client_publish && !s.namespaces[0].wildcards);
    assert!(s.namespaces[1].client_publish && s.namespaces[1].wildcards);
    let policy = s.history.policy(&s.namespaces);
    let limits = |size, secs| HistoryLimits {
        size,
        ttl: Duration::from_secs(secs),
    };
    // The namespace's size, the rule's TTL.
    assert_eq!(policy.limits("prices.eur"), limits(1, 120));
    assert_eq!(policy.limits("chat.r1"), limits(50, 300));
}

#[test]
fn bad_namespaces_name_their_key() {
    let cases = [
        ("name = \"Prices\"\npattern = \"p.>\"", "namespaces[0].name"),
        (
            "name = \"default\"\npattern = \"p.>\"",
            "namespaces[0].name",
        ),
        ("name = \"p\"\npattern = \"p.>.x\"", "namespaces[0].pattern"),
        (
            "name = \"p\"\npattern = \"p\"\nconflate_key = \"s\"",
            "namespaces[0].conflate_key",
        ),
        (
            "name = \"p\"\npattern = \"p\"\nslow_consumer = \"conflate\"\nconflate_key = \"a\\\"b\"",
            "namespaces[0].conflate_key",
        ),
        (
            "name = \"p\"\npattern = \"p\"\nmax_message_size = 70000",
            "namespaces[0].max_message_size",
        ),
        (
            "name = \"p\"\npattern = \"p\"\nhistory_ttl = \"0s\"",
            "namespaces[0].history_ttl",
        ),
        (
            "name = \"p\"\npattern = \"p\"\nhistory_ttl = \"400d\"",
            "namespaces[0].history_ttl",
        ),
        (
            "name = \"p\"\npattern = \"p\"\nslow_consumer = \"latest\"",
            "slow_consumer",
        ),
        ("name = \"p\"\npattern = \"p\"\nhistory = 3", "history"),
        ("pattern = \"p\"", "name"),
    ];
    for (body, key) in cases {
        let e = load_toml(&format!("[[namespaces]]\n{body}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{body}: {e}");
    }
    let e = load_toml(
        "[[namespaces]]\nname = \"a\"\npattern = \"a\"\n[[namespaces]]\nname = \"a\"\npattern = \"b\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("namespaces[1].name"), "{e}");
}

#[test]
fn example_file_loads_and_matches_defaults() {
    let example = include_str!("../../../deploy/pubgate.example.toml");
    let from_example = load_toml(example).unwrap();
    let defaults = load_toml("").unwrap();
    assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
}

#[test]
fn example_history_rules_load_when_uncommented() {
    let example = include_str!("../../../deploy/pubgate.example.toml");
    let mut in_history = false;
    let uncommented: Vec<&str> = example
        .lines()
        .map(|line| {
            if line.starts_with('[') {
                in_history = line == "[history]";
            }
            match line.strip_prefix("# ") {
                Some(rest)
                    if in_history
                        && ["[[history.rules]]", "pattern", "size", "ttl"]
                            .iter()
                            .any(|k| rest.starts_with(k)) =>
                {
                    rest
                }
                _ => line,
            }
        })
        .collect();
    let s = load_toml(&uncommented.join("\n")).unwrap();
    assert_eq!(s.history.rules.len(), 2);
    let policy = s.history.policy(&s.namespaces);
    assert_eq!(
        policy.limits("chat.r1"),
        HistoryLimits {
            size: 100,
            ttl: Duration::from_secs(60)
        }
    );
    assert_eq!(policy.limits("ticks.btc").size, 0);
}

#[test]
fn flags_override_file() {
    let dir = std::env::temp_dir().join(format!("pubgate-cfg-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1000\"\n").unwrap();
    let cli = Cli {
        config: Some(path),
        listen: Some("127.0.0.1:2000".into()),
        ..Cli::default()
    };
    let s = Settings::load(&cli).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(s.server.listen.port(), 2000);
}

#[test]
fn env_lists_are_split_on_commas_trimmed_and_kept_as_strings() {
    let s = load_env(&[
        ("PUBGATE__AUTH__API_KEYS", "k1, k2 ,,  k3,"),
        ("PUBGATE__AUTH__ANONYMOUS_SUBSCRIBE", " public.>, scores.* "),
        ("PUBGATE__AUTH__ANONYMOUS_PUBLISH", ""),
        (
            "pubgate__server__allowed_origins",
            "https://a.example,https://b.example",
        ),
    ])
    .unwrap();
    assert_eq!(s.auth.api_keys, ["k1", "k2", "k3"]);
    assert_eq!(
        s.auth.anonymous_subscribe.as_deref(),
        Some(&["public.>".to_string(), "scores.*".to_string()][..])
    );
    assert_eq!(s.auth.anonymous_publish.as_deref(), Some(&[][..]));
    assert_eq!(
        s.server.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    // Entries that look like numbers or booleans stay strings.
    for (value, keys) in [
        ("12345", vec!["12345"]),
        ("true", vec!["true"]),
        ("1.5, 007", vec!["1.5", "007"]),
        ("", vec![]),
        (" , ", vec![]),
    ] {
        let s = load_env(&[("PUBGATE__AUTH__API_KEYS", value)]).unwrap();
        assert_eq!(s.auth.api_keys, keys, "{value:?}");
        assert_eq!(s.has_credentials(), !keys.is_empty(), "{value:?}");
    }
}

#[test]
fn env_plain_keys_still_take_their_types_and_name_their_key() {
    let s = load_env(&[
        ("PUBGATE__SERVER__LISTEN", "127.0.0.1:9000"),
        ("PUBGATE__LIMITS__MAX_SUBSCRIPTIONS", "7"),
        ("PUBGATE__AUTH__ANONYMOUS", "true"),
        ("OTHER__AUTH__API_KEYS", "ignored"),
    ])
    .unwrap();
    assert_eq!(s.server.listen.port(), 9000);
    assert_eq!(s.limits.max_subscriptions, 7);
    assert_eq!(s.auth.anonymous, Some(true));
    assert!(s.auth.api_keys.is_empty());
    let e = load_env(&[("PUBGATE__LIMITS__MAX_SUBSCRIPTIONS", "many")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits.max_subscriptions"), "{e}");
}

#[test]
fn example_namespace_loads_when_uncommented() {
    let example = include_str!("../../../deploy/pubgate.example.toml");
    let start = example.find("# [[namespaces]]").expect("example namespace");
    let (head, tail) = example.split_at(start);
    let uncommented: Vec<&str> = tail
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect();
    let s = load_toml(&format!("{head}{}", uncommented.join("\n"))).unwrap();
    assert_eq!(s.namespaces.len(), 1);
    assert_eq!(
        s.namespaces[0].slow_consumer,
        Some(NamespacePolicy::Conflate)
    );
}
