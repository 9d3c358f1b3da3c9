//! Topic names and topic patterns.
//!
//! A topic is 1–200 characters of `[A-Za-z0-9_.:-]`, with `.` separating levels. A pattern is a topic
//! whose levels may be `*` (exactly one level) or, as the last level, `>` (one or more levels).

/// Longest topic name accepted.
pub const MAX_TOPIC_LEN: usize = 200;

/// Why a topic name was refused; the text goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty or longer than [`MAX_TOPIC_LEN`].
    #[error("topic must be 1-200 characters long")]
    Length,
    /// A character outside `[A-Za-z0-9_.:-]`.
    #[error("topic may contain only A-Z a-z 0-9 _ . : -")]
    Character,
    /// An empty level (`a..b`, a leading or trailing `.`).
    #[error("topic levels must not be empty")]
    EmptyLevel,
    /// `*` or `>`: a pattern, where one topic is needed (publishing, history).
    #[error("`*` and `>` are wildcards, which only a subscribe takes: name one topic")]
    Wildcard,
    /// A wildcard subscription that is not a valid pattern (`>` not last, a level mixing `*` with
    /// other characters).
    #[error(
        "invalid wildcard: `*` must be a whole level and `>` the whole last level (scores.*, scores.>)"
    )]
    BadWildcard,
}

/// Whether a subscription name has a wildcard level character (`*` or `>`): a pattern, not a topic.
pub fn is_wildcard(name: &str) -> bool {
    name.bytes().any(|b| matches!(b, b'*' | b'>'))
}

/// Checks a topic name.
pub fn validate(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::Length);
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        if is_wildcard(topic) {
            return Err(TopicError::Wildcard);
        }
        return Err(TopicError::Character);
    }
    if topic.split('.').any(str::is_empty) {
        return Err(TopicError::EmptyLevel);
    }
    Ok(())
}

/// What a subscribe names: one topic, or a wildcard pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One topic.
    Topic,
    /// A pattern with at least one wildcard level.
    Wildcard(Pattern),
}

/// Checks what a subscribe names: a topic, or a pattern with `*`/`>` levels.
pub fn parse_target(name: &str) -> Result<Target, TopicError> {
    match validate(name) {
        Ok(()) => Ok(Target::Topic),
        Err(TopicError::Wildcard) => Pattern::parse(name)
            .map(Target::Wildcard)
            .map_err(|_| TopicError::BadWildcard),
        Err(e) => Err(e),
    }
}

/// A parsed topic pattern (`scores.*`, `user.42.>`, `>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: &'static str,
}

impl Pattern {
    /// Parses a pattern.
    pub fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        let err = |reason| PatternError {
            pattern: pattern.to_string(),
            reason,
        };
        if pattern.is_empty() || pattern.len() > MAX_TOPIC_LEN {
            return Err(err("must be 1-200 characters long"));
        }
        let parts: Vec<&str> = pattern.split('.').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "*" => Level::One,
                ">" if i + 1 == parts.len() => Level::Rest,
                ">" => return Err(err("'>' may only be the last level")),
                exact => {
                    validate(exact).map_err(|_| err("levels are topic characters, '*' or '>'"))?;
                    Level::Exact(exact.to_string())
                }
            });
        }
        Ok(Pattern { levels })
    }

    /// The levels before the first wildcard, joined (`scores` for `scores.*.live`, empty for
    /// `*.nba`): every topic the pattern matches is below it, so subscribing it in the broker
    /// brings all of them, and little else.
    pub fn literal_prefix(&self) -> String {
        let exact: Vec<&str> = self
            .levels
            .iter()
            .map_while(|l| match l {
                Level::Exact(e) => Some(e.as_str()),
                _ => None,
            })
            .collect();
        exact.join(".")
    }

    /// Whether every topic `other` matches, this one matches too. Used to authorize a wildcard
    /// subscription by one granted pattern (a union of several granted patterns that together
    /// cover it is not looked for: refusing is the safe side).
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.levels.iter();
        for mine in &self.levels {
            let Some(their) = theirs.next() else {
                // They can stop where this still needs a level.
                return false;
            };
            match (mine, their) {
                (Level::Rest, _) => return true,
                (Level::One, Level::Exact(_) | Level::One) => {}
                (Level::Exact(a), Level::Exact(b)) if a == b => {}
                _ => return false,
            }
        }
        theirs.next().is_none()
    }

    /// Whether some topic matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        fn go(a: &[Level], b: &[Level]) -> bool {
            match (a.first(), b.first()) {
                (None, None) => true,
                // `>` takes one or more levels: all that the other has left, if it has any.
                (Some(Level::Rest), Some(_)) | (Some(_), Some(Level::Rest)) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some(Level::Exact(x)), Some(Level::Exact(y))) if x != y => false,
                (Some(_), Some(_)) => go(&a[1..], &b[1..]),
            }
        }
        go(&self.levels, &other.levels)
    }

    /// Whether `topic` (a valid topic name) matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for level in &self.levels {
            match (level, parts.next()) {
                (Level::Rest, Some(_)) => return true,
                (Level::One, Some(_)) => {}
                (Level::Exact(e), Some(p)) if e == p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// Whether any of `patterns` matches `topic`.
pub fn any_matches(patterns: &[Pattern], topic: &str) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

/// Whether `patterns` grant a subscription to `name`: a topic one of them matches, or a wildcard
/// one of them covers entirely.
pub fn grants(patterns: &[Pattern], name: &str) -> bool {
    if !is_wildcard(name) {
        return any_matches(patterns, name);
    }
    Pattern::parse(name).is_ok_and(|wanted| patterns.iter().any(|p| p.covers(&wanted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        assert!(validate("scores.nba").is_ok());
        assert!(validate("a:b-c_d.E9").is_ok());
        assert_eq!(validate(""), Err(TopicError::Length));
        assert_eq!(validate(&"a".repeat(201)), Err(TopicError::Length));
        assert!(validate(&"a".repeat(200)).is_ok());
        assert_eq!(validate("a b"), Err(TopicError::Character));
        assert_eq!(validate("ä"), Err(TopicError::Character));
        assert_eq!(validate("a..b"), Err(TopicError::EmptyLevel));
        assert_eq!(validate(".a"), Err(TopicError::EmptyLevel));
    }

    #[test]
    fn patterns() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p(">").matches("a"));
        assert!(p(">").matches("a.b.c"));
        assert!(p("scores.*").matches("scores.nba"));
        assert!(!p("scores.*").matches("scores.nba.live"));
        assert!(!p("scores.*").matches("scores"));
        assert!(p("user.42.>").matches("user.42.inbox"));
        assert!(!p("user.42.>").matches("user.42"));
        assert!(!p("user.42.>").matches("user.43.inbox"));
        assert!(p("a.b").matches("a.b"));
        assert!(!p("a.b").matches("a.bc"));
        assert!(Pattern::parse("a.>.b").is_err());
        assert!(Pattern::parse("a..b").is_err());
        assert!(Pattern::parse("a.b c").is_err());
    }

    #[test]
    fn subscribe_targets() {
        assert_eq!(parse_target("scores.nba"), Ok(Target::Topic));
        assert!(matches!(parse_target("scores.*"), Ok(Target::Wildcard(_))));
        assert!(matches!(parse_target(">"), Ok(Target::Wildcard(_))));
        assert_eq!(parse_target("scores.>.x"), Err(TopicError::BadWildcard));
        assert_eq!(parse_target("scores.n*"), Err(TopicError::BadWildcard));
        assert_eq!(parse_target("a b"), Err(TopicError::Character));
        assert_eq!(parse_target("a..*"), Err(TopicError::BadWildcard));
    }

    #[test]
    fn literal_prefixes() {
        let p = |s| Pattern::parse(s).unwrap().literal_prefix();
        assert_eq!(p("scores.*"), "scores");
        assert_eq!(p("scores.>"), "scores");
        assert_eq!(p("a.b.*.c"), "a.b");
        assert_eq!(p("*.nba"), "");
        assert_eq!(p(">"), "");
    }

    #[test]
    fn overlapping_patterns() {
        let overlaps = |a, b| {
            let (a, b) = (Pattern::parse(a).unwrap(), Pattern::parse(b).unwrap());
            assert_eq!(a.overlaps(&b), b.overlaps(&a), "symmetric");
            a.overlaps(&b)
        };
        assert!(overlaps(">", "prices.>"));
        assert!(overlaps("*.eur", "prices.*"));
        assert!(overlaps("prices.>", "prices.eur.live"));
        assert!(overlaps("*.*", "a.b"));
        assert!(!overlaps("prices.>", "scores.>"));
        assert!(!overlaps("prices.>", "prices"));
        assert!(!overlaps("*.*", "a.b.c"));
        assert!(!overlaps("a.*", "b.*"));
    }

    #[test]
    fn coverage_of_wildcards() {
        let covers = |a, b| {
            Pattern::parse(a)
                .unwrap()
                .covers(&Pattern::parse(b).unwrap())
        };
        assert!(covers(">", "scores.*"));
        assert!(covers(">", ">"));
        assert!(covers("scores.>", "scores.*"));
        assert!(covers("scores.>", "scores.nba.>"));
        assert!(covers("scores.>", "scores.>"));
        assert!(covers("scores.*", "scores.*"));
        assert!(covers("scores.*", "scores.nba"));
        assert!(covers("*.nba", "scores.nba"));
        assert!(covers("*.*", "scores.*"));
        // Refused: each of these matches a topic the grant does not.
        assert!(!covers("scores.*", "scores.>"));
        assert!(!covers("scores.*", "scores.*.live"));
        assert!(!covers("scores.nba", "scores.*"));
        assert!(!covers("scores.>", ">"));
        assert!(!covers("scores.>", "*.nba"));
        assert!(!covers("scores.>", "scores"));
        assert!(!covers("*.nba", "*.*"));
        assert!(!covers("a.*.c", "a.*.>"));
        assert!(!covers("user.42.>", "user.*.inbox"));
    }
}
