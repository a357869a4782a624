//! Who may publish and subscribe to which general topics: an `acl_file` in mosquitto's syntax,
//! read the way mosquitto 2.0 reads it, so a site points Hangar at the file its mosquitto uses.
//!
//! ```text
//! # lines before the first `user` line are for clients without a user name (lab mode)
//! topic [read|write|readwrite|deny] TOPIC    # readwrite when the access is left out
//! user NAME                                  # the lines after it are NAME's
//! pattern [read|write|readwrite|deny] TOPIC  # %u = user name, %c = client id; for everyone
//! ```
//!
//! A check looks at the client's own `topic` lines (denials first), then at the `pattern`
//! lines (denials first); the first line whose topic matches decides; nothing matching is a
//! refusal (deny by default). A line without `$` never matches a `$` topic. Patterns refuse a
//! client whose user name or client id contains `+` or `#` (it could widen its own patterns).
//! For a subscription the filter is checked as mosquitto checks a topic against a line, with
//! the filter's wildcards taken literally: `site/#` grants `site/+/telemetry`, not `#`; and a
//! denial that could match part of a granted filter is also checked per message (see
//! [`Grant`]). Devices' OTA topics are not decided here: the front door keeps them closed.

use std::collections::HashMap;

use super::topics;

/// Read, write, or both; `deny` is an entry with neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    read: bool,
    write: bool,
}

impl Access {
    const DENY: Access = Access {
        read: false,
        write: false,
    };

    fn allows(self, want: Want) -> bool {
        match want {
            Want::Read => self.read,
            Want::Write => self.write,
        }
    }
}

/// What a client wants to do on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Receive (subscribe).
    Read,
    /// Publish.
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    access: Access,
    topic: String,
}

/// A parsed acl_file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// `topic` lines per user name (`None`: before any `user` line, for anonymous clients);
    /// denials first, then the others in file order.
    users: HashMap<Option<String>, Vec<Line>>,
    /// `pattern` lines, denials first.
    patterns: Vec<Line>,
}

/// Why an acl_file is refused, with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct AclError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

fn parse_access(s: &str) -> Option<Access> {
    Some(match s {
        "read" => Access {
            read: true,
            write: false,
        },
        "write" => Access {
            read: false,
            write: true,
        },
        "readwrite" => Access {
            read: true,
            write: true,
        },
        "deny" => Access::DENY,
        _ => return None,
    })
}

fn push(list: &mut Vec<Line>, l: Line) {
    if l.access == Access::DENY {
        let at = list.iter().take_while(|x| x.access == Access::DENY).count();
        list.insert(at, l);
    } else {
        list.push(l);
    }
}

impl Acl {
    /// Parses an acl_file's text.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let err = |reason: String| AclError {
                line: n + 1,
                reason,
            };
            let line = raw.trim_end();
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let line = line.trim_start();
            let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
            match word {
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(err("`user` without a user name".into()));
                    }
                    user = Some(name.to_string());
                }
                "topic" | "pattern" => {
                    let rest = rest.trim_start();
                    if rest.is_empty() {
                        return Err(err(format!("`{word}` without a topic")));
                    }
                    // the access word is optional: a first token that is not one is the topic
                    let (access, topic) = match rest.split_once(' ') {
                        Some((a, t)) => match parse_access(a) {
                            Some(acc) => (acc, t.trim()),
                            None => {
                                return Err(err(format!(
                                    "access {a:?} is not read, write, readwrite or deny"
                                )));
                            }
                        },
                        None => (
                            Access {
                                read: true,
                                write: true,
                            },
                            rest,
                        ),
                    };
                    if !crate::server::broker::packet::valid_filter(topic) {
                        return Err(err(format!("{topic:?} is not a valid topic filter")));
                    }
                    let l = Line {
                        access,
                        topic: topic.to_string(),
                    };
                    if word == "topic" {
                        push(acl.users.entry(user.clone()).or_default(), l);
                    } else {
                        push(&mut acl.patterns, l);
                    }
                }
                other => {
                    return Err(err(format!(
                        "{other:?} is not `topic`, `pattern` or `user`"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Whether the client (`user`: its user name, `None` if it gave none) may read or write
    /// `topic` — a topic name, or a subscription's filter with its wildcards taken literally.
    pub fn allows(&self, user: Option<&str>, client_id: &str, topic: &str, want: Want) -> bool {
        self.decide(user, client_id, topic, want).unwrap_or(false)
    }

    /// The first matching line's verdict, `None` when no line matches.
    fn decide(&self, user: Option<&str>, client_id: &str, topic: &str, want: Want) -> Option<bool> {
        let own = self.users.get(&user.map(str::to_string));
        for l in own.into_iter().flatten() {
            if literal_match(&l.topic, topic) {
                if l.access == Access::DENY {
                    return Some(false);
                }
                if l.access.allows(want) {
                    return Some(true);
                }
            }
        }
        if self.patterns.is_empty() {
            return None;
        }
        if user.is_some_and(|u| u.contains(['+', '#'])) || client_id.contains(['+', '#']) {
            return Some(false);
        }
        for l in &self.patterns {
            if l.topic.contains("%u") && user.is_none() {
                continue;
            }
            let t = l
                .topic
                .replace("%c", client_id)
                .replace("%u", user.unwrap_or(""));
            if literal_match(&t, topic) {
                if l.access == Access::DENY {
                    return Some(false);
                }
                if l.access.allows(want) {
                    return Some(true);
                }
            }
        }
        None
    }

    /// What a subscription to `filter` is granted: refused, allowed for every message, or
    /// allowed with each message checked (a denial or a narrower grant could cover part of
    /// the topics the filter matches).
    pub fn grant(&self, user: Option<&str>, client_id: &str, filter: &str) -> Grant {
        if !self.allows(user, client_id, filter, Want::Read) {
            return Grant::Refused;
        }
        if !filter.contains(['+', '#']) {
            return Grant::All;
        }
        let own = self.users.get(&user.map(str::to_string));
        let lines = || own.into_iter().flatten().chain(self.patterns.iter());
        let topic = |l: &Line| {
            l.topic
                .replace("%c", client_id)
                .replace("%u", user.unwrap_or(""))
        };
        let partial = lines()
            .filter(|l| l.access == Access::DENY || !l.access.read)
            .any(|l| topics::intersect(&topic(l), filter));
        // whole only when one readable line matches every topic the filter can match (a
        // `topic +` line lets a client subscribe to `#`, as mosquitto does, but not read `a/b`)
        let covered = lines()
            .filter(|l| l.access != Access::DENY && l.access.read)
            .any(|l| covers(&topic(l), filter));
        if partial || !covered {
            Grant::PerMessage
        } else {
            Grant::All
        }
    }
}

/// Whether every topic `filter` matches is matched by the ACL line `line` (both may hold
/// `+` and `#`).
fn covers(line: &str, filter: &str) -> bool {
    if filter.starts_with('$') && !line.starts_with('$') {
        return false;
    }
    let mut l = line.split('/');
    let mut f = filter.split('/');
    loop {
        match (l.next(), f.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) => {
                if x != y || y == "+" {
                    return false;
                }
            }
        }
    }
}

/// A subscription's grant ([`Acl::grant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// SUBACK 0x80.
    Refused,
    /// Every message the filter matches may be delivered.
    All,
    /// Each message is checked for read access before it is delivered.
    PerMessage,
}

/// mosquitto's `topic_matches_sub(line, topic)` with the topic's own `+`/`#` taken as plain
/// characters (a subscription's filter checked against a line), and `$` topics matched only by
/// lines that start with `$`.
fn literal_match(line: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !line.starts_with('$') {
        return false;
    }
    topics::levels_match(line, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_is_granted_whole_only_when_one_line_covers_it() {
        // found by the mqtt_general fuzz target: `topic +` let `#` through unchecked
        let acl = Acl::parse("topic +\nuser u\ntopic read site/#\ntopic read a/+/c\n").unwrap();
        assert_eq!(acl.grant(None, "c", "#"), Grant::PerMessage);
        assert!(!acl.allows(None, "c", "/t", Want::Read));
        assert_eq!(acl.grant(None, "c", "+"), Grant::All);
        let u = Some("u");
        assert_eq!(acl.grant(u, "c", "site/#"), Grant::All);
        assert_eq!(acl.grant(u, "c", "site/+/t"), Grant::All);
        assert_eq!(acl.grant(u, "c", "a/+/c"), Grant::All);
        assert_eq!(acl.grant(u, "c", "a/b/c"), Grant::All);
        assert_eq!(acl.grant(u, "c", "a/#"), Grant::Refused);
        for (line, filter, want) in [
            ("#", "#", true),
            ("#", "$SYS/#", false),
            ("site/#", "site", true),
            ("site/+", "site/#", false),
            ("site/+", "site/+", true),
            ("site/x", "site/+", false),
            ("+/+", "a/b/c", false),
            ("a/+/c", "a/b", false),
        ] {
            assert_eq!(covers(line, filter), want, "{line} covers {filter}");
        }
    }

    const FILE: &str = "\
# anonymous clients (lab mode)
topic deny test/nosubscribe
topic readwrite #

user scada
topic read site/#
topic write site/+/cmd
topic deny site/secret/#

user historian
topic read site/#

pattern readwrite site/%u/#
pattern write devices/%c/status
pattern deny site/+/private
";

    fn acl() -> Acl {
        Acl::parse(FILE).unwrap()
    }

    #[test]
    fn users_patterns_and_anonymous_clients_as_mosquitto_reads_them() {
        let a = acl();
        let (r, w) = (Want::Read, Want::Write);
        // anonymous: everything but test/nosubscribe
        assert!(a.allows(None, "c1", "a/b", w));
        assert!(!a.allows(None, "c1", "test/nosubscribe", r));
        assert!(
            !a.allows(None, "c1", "$SYS/x", r),
            "# does not match $ topics"
        );
        // scada: reads site/#, writes site/+/cmd, never site/secret/#
        assert!(a.allows(Some("scada"), "s", "site/GW1/telemetry", r));
        assert!(!a.allows(Some("scada"), "s", "site/GW1/telemetry", w));
        assert!(a.allows(Some("scada"), "s", "site/GW1/cmd", w));
        assert!(!a.allows(Some("scada"), "s", "site/secret/x", r));
        assert!(!a.allows(Some("scada"), "s", "other", r), "deny by default");
        // patterns for everyone with a user name: %u and %c fill in
        assert!(a.allows(Some("GW7"), "c9", "site/GW7/telemetry", w));
        assert!(!a.allows(Some("GW7"), "c9", "site/GW8/telemetry", w));
        assert!(a.allows(Some("GW7"), "c9", "devices/c9/status", w));
        assert!(!a.allows(Some("GW7"), "c9", "devices/c9/status", r));
        // a pattern denial comes before a grant
        assert!(!a.allows(Some("GW7"), "c9", "site/GW7/private", w));
        // a user name that could widen its patterns is refused
        assert!(!a.allows(Some("+"), "c9", "site/x/telemetry", w));
        assert!(!a.allows(Some("GW7"), "#", "devices/#/status", w));
        // an unknown user gets the patterns only
        assert!(!a.allows(Some("nobody"), "n", "a/b", w));
    }

    #[test]
    fn subscriptions_are_granted_whole_or_checked_per_message() {
        let a = acl();
        assert_eq!(
            a.grant(Some("historian"), "h", "site/+/telemetry"),
            Grant::All
        );
        assert_eq!(a.grant(Some("historian"), "h", "#"), Grant::Refused);
        // scada reads site/# but not site/secret/#: site/# is checked per message
        assert_eq!(a.grant(Some("scada"), "s", "site/#"), Grant::PerMessage);
        assert_eq!(a.grant(Some("scada"), "s", "site/secret/x"), Grant::Refused);
        assert_eq!(a.grant(None, "c", "test/nosubscribe"), Grant::Refused);
        assert_eq!(a.grant(None, "c", "#"), Grant::PerMessage);
        assert_eq!(a.grant(None, "c", "a/b"), Grant::All);
    }

    #[test]
    fn bad_files_are_refused_with_their_line() {
        for (text, line) in [
            ("topic\n", 1),
            ("# ok\ntopic sometimes a/b\n", 2),
            ("user\n", 1),
            ("topic read a/#/b\n", 1),
            ("allow all\n", 1),
        ] {
            assert_eq!(Acl::parse(text).unwrap_err().line, line, "{text:?}");
        }
        // an access word left out means readwrite; a topic with a space needs the access word
        let a = Acl::parse("topic a/b\ntopic read c d/e\n").unwrap();
        assert!(a.allows(None, "c", "a/b", Want::Write));
        assert!(a.allows(None, "c", "c d/e", Want::Read));
        assert!(Acl::parse("topic c d/e\n").is_err());
    }
}
