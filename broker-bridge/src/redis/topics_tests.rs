//! Unit tests of [`super::Topics`]: what reaches the sink for wire messages, fills and gaps.

use super::*;

/// Records what reaches the sink.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl MessageSink for Seen {
    fn deliver(&self, m: Message) {
        let p = m.position.map(|p| format!("{}:{}", p.epoch, p.offset));
        lock(&self.0).push(format!("{} {}", p.unwrap_or("raw".into()), m.data.len()));
    }
    fn gap(&self, _topic: &str, resume: &Position, lost: Lost) {
        let raw = if lost == Lost::Raw { " raw" } else { "" };
        lock(&self.0).push(format!("gap {}:{}{raw}", resume.epoch, resume.offset));
    }
}

#[derive(Default)]
struct Count(Mutex<Vec<String>>);

impl BrokerObserver for Count {
    fn rejected(&self, reason: &'static str) {
        lock(&self.0).push(reason.into());
    }
}

fn topics() -> (Topics, Arc<Seen>, Arc<Count>) {
    let seen = Arc::new(Seen::default());
    let count = Arc::new(Count::default());
    let t = Topics::new(seen.clone(), count.clone(), (5, 1000));
    t.want("t");
    let salt: Salt = "5a17".into();
    t.hint("t", &at("e1", 10), &salt);
    (t, seen, count)
}

fn at(epoch: &str, offset: u64) -> Position {
    Position {
        epoch: Epoch::new(epoch),
        offset,
    }
}

/// A history read that returned no message (history off, or trimmed) at `position`.
fn nothing_at(position: Position) -> Replay {
    Replay {
        position,
        complete: false,
        messages: vec![],
    }
}

fn msg(epoch: &str, offset: u64, salt: &str) -> Bytes {
    Bytes::from(wire::encode(epoch, offset, salt, b"{}"))
}

#[test]
fn raw_messages_dropped_are_signalled_as_raw_loss_after_the_last_delivered() {
    let (t, seen, _) = topics();
    assert_eq!(t.on_wire("t", msg("e1", 11, "5a17")), Handled::Done);
    // A raw message was dropped (a reconnect, a full buffer): no history holds it.
    assert!(t.fill_one("t", true));
    assert!(t.fill_read(
        "t",
        Some(&at("e1", 11)),
        nothing_at(at("e1", 11)),
        "5a17".into()
    ));
    assert_eq!(*lock(&seen.0), ["e1:11 2", "gap e1:11 raw"]);
    // Offsets lost are not raw loss.
    assert!(t.fill_one("t", false));
    assert!(t.fill_read(
        "t",
        Some(&at("e1", 11)),
        nothing_at(at("e1", 13)),
        "5a17".into()
    ));
    assert_eq!(lock(&seen.0)[2], "gap e1:13");
}

#[test]
fn live_messages_are_checked_deduplicated_and_holes_start_a_fill() {
    let (t, seen, count) = topics();
    assert_eq!(t.on_wire("t", msg("e1", 11, "5a17")), Handled::Done);
    assert_eq!(t.on_wire("t", msg("e1", 11, "5a17")), Handled::Done);
    assert_eq!(t.on_wire("t", msg("e1", 12, "bad0")), Handled::Done);
    assert_eq!(
        t.on_wire("t", Bytes::from_static(b"{\"raw\":1}")),
        Handled::Done
    );
    assert_eq!(*lock(&seen.0), ["e1:11 2", "raw 9"]);
    assert_eq!(*lock(&count.0), ["forged"]);
    // A hole: held, not delivered past.
    assert_eq!(t.on_wire("t", msg("e1", 14, "5a17")), Handled::StartFill);
    assert_eq!(t.on_wire("t", msg("e1", 15, "5a17")), Handled::Done);
    assert_eq!(lock(&seen.0).len(), 2);
    // The fill finds 12 and 13 in history, then the held 14 and 15 follow.
    let from = at("e1", 11);
    let replay = Replay {
        position: at("e1", 14),
        complete: true,
        messages: [12, 13, 14]
            .map(|o| Message {
                topic: "t".into(),
                position: Some(at("e1", o)),
                data: Bytes::from_static(b"[]"),
            })
            .into(),
    };
    assert!(t.fill_read("t", Some(&from), replay, "5a17".into()));
    assert_eq!(
        *lock(&seen.0),
        [
            "e1:11 2", "raw 9", "e1:12 2", "e1:13 2", "e1:14 2", "e1:15 2"
        ]
    );
}

#[test]
fn a_fill_too_large_to_push_becomes_a_gap_the_subscribers_resume() {
    let (t, seen, _) = topics();
    assert_eq!(t.on_wire("t", msg("e1", 20, "5a17")), Handled::StartFill);
    let replay = Replay {
        position: at("e1", 20),
        complete: true,
        messages: (11..=20)
            .map(|o| Message {
                topic: "t".into(),
                position: Some(at("e1", o)),
                data: Bytes::from_static(b"{}"),
            })
            .collect(),
    };
    assert!(t.fill_read("t", Some(&at("e1", 10)), replay, "5a17".into()));
    assert_eq!(
        *lock(&seen.0),
        ["gap e1:20"],
        "10 messages > the limit of 5"
    );
    assert_eq!(t.on_wire("t", msg("e1", 21, "5a17")), Handled::Done);
    assert_eq!(*lock(&seen.0), ["gap e1:20", "e1:21 2"]);
}

#[test]
fn with_history_off_a_hole_loses_only_what_was_never_held() {
    let (t, seen, _) = topics();
    // 11 and 12 never came; 13 and 14 did. History (off) holds nothing.
    assert_eq!(t.on_wire("t", msg("e1", 13, "5a17")), Handled::StartFill);
    assert_eq!(t.on_wire("t", msg("e1", 14, "5a17")), Handled::Done);
    let empty = nothing_at(at("e1", 14));
    assert!(t.fill_read("t", Some(&at("e1", 10)), empty, "5a17".into()));
    assert_eq!(*lock(&seen.0), ["gap e1:12", "e1:13 2", "e1:14 2"]);
}

#[test]
fn a_held_duplicate_does_not_hide_the_hole_after_it() {
    let (t, seen, _) = topics();
    assert_eq!(t.on_wire("t", msg("e1", 13, "5a17")), Handled::StartFill);
    // A duplicate from before the hole, held behind it (a reconnect's replay).
    assert_eq!(t.on_wire("t", msg("e1", 9, "5a17")), Handled::Done);
    let empty = nothing_at(at("e1", 13));
    assert!(t.fill_read("t", Some(&at("e1", 10)), empty, "5a17".into()));
    assert_eq!(*lock(&seen.0), ["gap e1:12", "e1:13 2"]);
}

#[test]
fn with_history_off_a_new_epochs_first_messages_are_delivered() {
    let (t, seen, _) = topics();
    t.want("fresh");
    // Subscribed while the topic did not exist; its first publishes start an epoch whose
    // salt the node learns from a read that (history off) returns no message.
    t.hint("fresh", &at(EMPTY_EPOCH, 0), &Salt::from(""));
    assert_eq!(t.on_wire("fresh", msg("e5", 1, "c0de")), Handled::StartFill);
    assert_eq!(t.on_wire("fresh", msg("e5", 2, "c0de")), Handled::Done);
    let empty = || nothing_at(at("e5", 2));
    let from = at(EMPTY_EPOCH, 0);
    assert!(!t.fill_read("fresh", Some(&from), empty(), "c0de".into()));
    let FillFrom::After(Some(from)) = t.fill_from("fresh") else {
        panic!("reads again from the new epoch's start");
    };
    assert!(t.fill_read("fresh", Some(&from), empty(), "c0de".into()));
    // No gap either: nothing came before the topic's first epoch (protocol.md, gap frames).
    assert_eq!(*lock(&seen.0), ["e5:1 2", "e5:2 2"]);
    assert_eq!(t.on_wire("fresh", msg("e5", 3, "c0de")), Handled::Done);
    assert_eq!(lock(&seen.0).len(), 3);
}

#[test]
fn a_new_epoch_is_read_before_delivery_and_forged_epochs_are_dropped() {
    let (t, seen, count) = topics();
    // Redis rolled back: a new epoch, whose salt the node does not know yet.
    assert_eq!(t.on_wire("t", msg("e2", 1, "beef")), Handled::StartFill);
    assert_eq!(t.on_wire("t", msg("ffff", 9, "0000")), Handled::Done);
    let first = nothing_at(at("e2", 1));
    assert!(!t.fill_read("t", Some(&at("e1", 10)), first, "beef".into()));
    assert_eq!(*lock(&seen.0), ["gap e2:0"]);
    let FillFrom::After(Some(from)) = t.fill_from("t") else {
        panic!("reads again from the new epoch's start");
    };
    assert_eq!(from, at("e2", 0));
    let second = Replay {
        position: at("e2", 1),
        complete: true,
        messages: vec![Message {
            topic: "t".into(),
            position: Some(at("e2", 1)),
            data: Bytes::from_static(b"{}"),
        }],
    };
    assert!(t.fill_read("t", Some(&from), second, "beef".into()));
    assert_eq!(*lock(&seen.0), ["gap e2:0", "e2:1 2"]);
    assert_eq!(*lock(&count.0), ["forged"], "the made-up epoch");
    assert_eq!(t.on_wire("t", msg("e2", 2, "beef")), Handled::Done);
    assert_eq!(*lock(&seen.0), ["gap e2:0", "e2:1 2", "e2:2 2"]);
}
