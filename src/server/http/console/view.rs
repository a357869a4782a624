//! Small pieces every console page uses: sizes, times, badges, bars and charts (inline SVG, so
//! no chart library and nothing to fetch).

use maud::{Markup, html};

/// `1.2 MB`, `980 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// How long ago `ms` was, relative to `now_ms`: `12 s ago`, `3 min ago`, `5 h ago`, `2 d ago`.
pub fn ago(ms: i64, now_ms: i64) -> String {
    let s = ((now_ms - ms) / 1000).max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A duration in words: `45 s`, `12 min`, `3 h 5 min`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs / 60 % 60),
    }
}

/// A UTC time for people: `2026-12-01 21:05:09 UTC`.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

/// A status word in its colour.
pub fn badge(status: &str) -> Markup {
    let class = match status {
        "completed" | "released" | "ready" | "online" | "ok" | "valid" => "good",
        "failed" | "cancelled" | "rolled back" | "offline" | "deprecated" | "invalid" => "bad",
        "stale" | "paused" | "retrying" | "skipped" => "warn",
        "pending" | "queued" | "scheduled" | "draft" | "testing" | "none" => "idle",
        _ => "busy",
    };
    html! { span class={"badge " (class)} { (status) } }
}

/// A progress bar with its value in words beside it (a native `<progress>`: no inline style,
/// which the pages' content security policy forbids).
pub fn progress(percent: f64, label: &str) -> Markup {
    let p = percent.clamp(0.0, 100.0);
    html! {
        progress value=(format!("{p:.1}")) max="100" {}
        " " span.barlabel { (label) }
    }
}

/// A horizontal bar chart: one row per (label, value), scaled to the largest.
pub fn bar_chart(title: &str, rows: &[(String, f64, String)]) -> Markup {
    // room for a 28-character label, a 300-unit bar and a 40-character value: nothing is cut
    // off (a longer label is shortened, and whole in its tooltip)
    const LABEL: usize = 28;
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max).max(1e-9);
    let h = 22 * rows.len().max(1) + 8;
    let short = |l: &str| {
        if l.chars().count() <= LABEL {
            l.to_string()
        } else {
            let mut t: String = l.chars().take(LABEL - 1).collect();
            t.push('…');
            t
        }
    };
    html! {
        figure.chart {
            figcaption { (title) }
            @if rows.is_empty() {
                p.muted { "nothing yet" }
            } @else {
                svg role="img" aria-label=(title) viewBox=(format!("0 0 820 {h}")) width="100%" {
                    @for (i, (label, v, text)) in rows.iter().enumerate() {
                        @let y = 4 + i * 22;
                        g {
                            title { (label) ": " (text) }
                            text x="0" y=(y + 15) class="lbl" { (short(label)) }
                            rect x="220" y=(y + 2) height="16" rx="3" width=(format!("{:.1}", 300.0 * v / max)) {}
                            text x=(format!("{:.1}", 226.0 + 300.0 * v / max)) y=(y + 15) class="val" { (text) }
                        }
                    }
                }
            }
        }
    }
}

/// A link to the same page with one query parameter changed (and the page reset).
pub fn with_param(
    base: &str,
    q: &std::collections::HashMap<String, String>,
    key: &str,
    value: &str,
) -> String {
    let mut pairs: Vec<(&str, &str)> = q
        .iter()
        .filter(|(k, _)| k.as_str() != key && k.as_str() != "live" && k.as_str() != "page")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if !value.is_empty() {
        pairs.push((key, value));
    }
    pairs.sort();
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let qs: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    if qs.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", qs.join("&"))
    }
}

/// A path segment, percent-encoded (device ids of the Alibaba protocol hold a `/`).
pub fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_sizes_and_times() {
        assert_eq!(bytes(980), "980 B");
        assert_eq!(bytes(1_234_567), "1.2 MB");
        assert_eq!(ago(0, 61_000), "1 min ago");
        assert_eq!(duration(3_900), "1 h 5 min");
    }

    #[test]
    fn markup_escapes_what_it_is_given() {
        let m = badge("<script>alert(1)</script>").into_string();
        assert!(m.contains("&lt;script&gt;"), "{m}");
        assert!(!m.contains("<script>"), "{m}");
    }

    #[test]
    fn links_keep_the_other_filters() {
        let mut q = std::collections::HashMap::new();
        q.insert("type".to_string(), "gw".to_string());
        q.insert("page".to_string(), "3".to_string());
        assert_eq!(
            with_param("/", &q, "sort", "version"),
            "/?sort=version&type=gw"
        );
        assert_eq!(with_param("/", &q, "type", ""), "/");
    }
}
