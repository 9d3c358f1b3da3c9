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
    /// `*` or `>`: a pattern, where one topic is needed.
    #[error(
        "`*` and `>` are wildcards, and wildcard subscriptions are not supported yet: name one topic"
    )]
    Wildcard,
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
        if topic.bytes().any(|b| matches!(b, b'*' | b'>')) {
            return Err(TopicError::Wildcard);
        }
        return Err(TopicError::Character);
    }
    if topic.split('.').any(str::is_empty) {
        return Err(TopicError::EmptyLevel);
    }
    Ok(())
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
}
