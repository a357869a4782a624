//! Campaign pages: the list, the form with its live dry run, and a campaign's detail — a wave
//! strip with each gate in words, the in-flight table with byte progress and a stale flag,
//! failures grouped by error code, bytes full / delta / saved, and the actions.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};

use super::view::{self, ago, badge, bytes, seg, when};
use super::{AppState, Nav, answer, live_only, refused};
use crate::server::accounts::Principal;
use crate::server::campaigns::progress::{Progress, WaveProgress};
use crate::server::store::{CampaignRecord, CampaignStatus, FirmwareStatus, MemberStatus, Role};

type ApiResult = Result<Response, super::super::error::ApiError>;

/// The states a member in flight is counted in.
const IN_FLIGHT: [&str; 4] = ["pending", "downloading", "verifying", "installing"];

/// One wave's gate in words, e.g. `wave 2: 96 % ≥ 90 %, advancing` (waves count from 1, as
/// `current` does).
pub fn gate_words(
    w: &WaveProgress,
    threshold: f64,
    current: Option<u32>,
    status: CampaignStatus,
) -> String {
    let n = w.wave;
    let count = |k: &str| w.counts.get(k).copied().unwrap_or(0);
    let skipped = count("skipped");
    let members = (w.devices as u64).saturating_sub(skipped);
    if members == 0 {
        return format!("wave {n}: no devices");
    }
    let ok = count("completed");
    let pct = ok as f64 * 100.0 / members as f64;
    let flying: u64 = IN_FLIGHT.iter().map(|k| count(k)).sum();
    let met = pct >= threshold;
    let cmp = if met { "≥" } else { "<" };
    let head = format!("wave {n}: {pct:.0} % {cmp} {threshold:.0} %");
    match current {
        Some(c) if w.wave > c => format!("wave {n}: waits for wave {c}"),
        Some(c) if w.wave == c => match status {
            CampaignStatus::Paused => format!("{head}, paused"),
            CampaignStatus::Cancelled => format!("{head}, braked"),
            CampaignStatus::Scheduled => format!("wave {n}: not started"),
            _ if met => format!("{head}, advancing"),
            _ => format!("{head}, in progress ({flying} upgrading)"),
        },
        _ if met => format!("{head}, passed"),
        _ if status == CampaignStatus::Paused => format!("{head}, held: below the gate"),
        _ => format!("{head}, ended"),
    }
}

/// GET /campaigns
pub async fn list(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let mut rows = Vec::new();
    let mut all = st.campaigns.list()?;
    all.sort_by_key(|c| std::cmp::Reverse(c.created_at_ms));
    for c in all {
        let m = st.campaigns.members(&c.id)?;
        let p = st
            .campaigns
            .progress(&c, &m)
            .map_err(super::super::error::ApiError::internal)?;
        rows.push((c, p));
    }
    let before = html! {
        @if who.role >= Role::Operator { p { a.button href="/campaigns/new" { "New campaign" } } }
    };
    let live = html! {
        table.campaigns {
            thead { tr { th { "Campaign" } th { "Target" } th { "State" } th { "Progress" } th { "Failed" } th { "Created" } } }
            tbody {
                @for (c, p) in &rows {
                    @let done = p.counts.get("completed").copied().unwrap_or(0);
                    tr {
                        td { a href=(format!("/campaigns/{}", seg(&c.id))) { (c.name) } " " span.muted { (c.id) } }
                        td { (c.device_type) " → " (c.version) }
                        td { (badge(c.status.as_str())) }
                        td { (view::progress(pct(done, p.total), &format!("{done} of {}", p.total))) }
                        td { (p.counts.get("failed").copied().unwrap_or(0)) }
                        td { (when(c.created_at_ms)) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.muted { "No campaign yet." } }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Campaigns,
        "Campaigns",
        "campaigns",
        before,
        live,
    ))
}

fn pct(n: u64, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// GET /campaigns/new — the form; the script runs the dry run beside it as it changes.
pub async fn new(State(st): State<AppState>, Extension(who): Extension<Principal>) -> ApiResult {
    if who.role < Role::Operator {
        return Ok(refused(
            &who,
            StatusCode::FORBIDDEN,
            "creating a campaign needs the operator role",
        ));
    }
    let released = st.firmware.list(None, Some(FirmwareStatus::Released))?;
    let form = html! {
        div.split {
            form #campaign-form.card {
                label { "Name " input name="name" required maxlength="200" placeholder="line 3 to 1.0.2"; }
                label { "Firmware "
                    select name="firmware" required {
                        @for f in &released { option value=(format!("{}|{}", f.device_type, f.version)) { (f.device_type) " " (f.version) } }
                    }
                }
                fieldset {
                    legend { "Devices" }
                    label { input type="radio" name="targetKind" value="all" checked; " every device of the type" }
                    label { input type="radio" name="targetKind" value="filter"; " from versions / tags: "
                        input name="fromVersions" placeholder="1.0.1, 1.0.0" maxlength="1000";
                        input name="tags" placeholder="line-3" maxlength="1000"; }
                    label { input type="radio" name="targetKind" value="ids"; " these ids: "
                        textarea name="deviceIds" rows="2" maxlength="200000" placeholder="GW1 GW2" {} }
                }
                div.row {
                    label { "Waves (%) " input name="waves" value="10, 50, 100" maxlength="200"; }
                    label { "Success gate (%) " input name="successThreshold" type="number" min="0" max="100" value="90"; }
                }
                div.row {
                    label { "Pause at failures (%) " input name="failurePercent" type="number" min="0" max="100" value="20"; }
                    label { "and at least " input name="failureMin" type="number" min="1" value="3"; }
                    label { "In flight at most " input name="maxInFlight" type="number" min="1" value="50"; }
                    label { "Retries " input name="retries" type="number" min="0" max="10" value="1"; }
                }
                fieldset {
                    legend { "When" }
                    label { "Start at " input name="startAt" type="datetime-local"; span.muted { " (empty: now; in this browser's time zone)" } }
                    div.row {
                        label { "Daily window (the appliance's local time) from " input name="windowStart" type="time"; }
                        label { "for (minutes) " input name="windowMinutes" type="number" min="1" max="1440" placeholder="180"; }
                        span.muted { "empty: any time of day" }
                    }
                }
                label { input type="checkbox" name="dynamic"; " take in devices that appear later" }
                label { input type="checkbox" name="force"; " force (even devices on that version)" }
                p.muted.small {
                    "The form suggests a canary. What the API does with a field left out: one wave of 100 %, success gate 100 %, "
                    "pause when 100 % have failed (at least 1), 50 in flight, no retries, now, any time of day."
                }
                p #campaign-error.error role="alert" {}
                button type="submit" disabled[released.is_empty()] { "Start the campaign" }
                @if released.is_empty() { p.muted { "Release a firmware first." } }
            }
            section #dry-run.card aria-live="polite" {
                h2 { "Dry run" }
                p.muted { "Fill in the form: who is in which wave appears here." }
            }
        }
    };
    Ok(answer(
        &who,
        false,
        Nav::Campaigns,
        "New campaign",
        "",
        form,
        html! {},
    ))
}

/// GET /campaigns/{id}
pub async fn detail(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let Ok(c) = st.campaigns.get(&id) else {
        return Ok(refused(
            &who,
            StatusCode::NOT_FOUND,
            &format!("no campaign {id}"),
        ));
    };
    let members = st.campaigns.members(&id)?;
    let p = st
        .campaigns
        .progress(&c, &members)
        .map_err(super::super::error::ApiError::internal)?;
    let now = crate::time::now_ms();
    let stale_ms = st.stale_secs as i64 * 1000;
    let mut flying = Vec::new();
    let mut saved = 0u64;
    for m in &members {
        let Some(t) = m.task_id.and_then(|t| st.store.get_task(t).ok().flatten()) else {
            continue;
        };
        if let Some(d) = &t.delta
            && t.status.as_str() == "completed"
        {
            saved += t.file_size.saturating_sub(d.size);
        }
        if m.status == MemberStatus::InFlight && t.status.is_active() {
            let stale = t.start_time_ms.is_some() && now - t.updated_at_ms > stale_ms;
            flying.push((m.device_id.clone(), t, stale));
        }
    }
    let operator = who.role >= Role::Operator;
    let base = format!("/api/ota/campaigns/{}", seg(&c.id));
    let before = html! {
        section.card {
            p { (c.device_type) " → " b { (c.version) } " · waves " (c.waves.iter().map(|w| format!("{w:.0} %")).collect::<Vec<_>>().join(", "))
                " · success gate " (format!("{:.0}", c.success_threshold)) " % · pauses at " (format!("{:.0}", c.failure_percent)) " % failed (at least " (c.failure_min_count) ")"
                " · at most " (c.max_in_flight) " in flight" }
            @if operator && (c.status.is_live() || p.counts.get("failed").copied().unwrap_or(0) > 0) {
                div.actions #campaign-actions {
                    @if matches!(c.status, CampaignStatus::Running | CampaignStatus::Scheduled) {
                        button.act type="button" data-post=(format!("{base}/pause")) { "Pause" }
                    }
                    @if c.status == CampaignStatus::Paused {
                        " " button.act type="button" data-post=(format!("{base}/resume")) { "Resume" }
                    }
                    @if p.counts.get("failed").copied().unwrap_or(0) > 0 && c.status != CampaignStatus::Cancelled {
                        " " button.act type="button" data-post=(format!("{base}/retry")) { "Retry failed" }
                    }
                    @if c.status.is_live() {
                        " " button #brake.act.danger type="button" data-post=(format!("{base}/cancel"))
                            data-confirm=(brake_question(&c, &flying)) { "Brake" }
                    }
                }
            }
        }
    };
    let live = detail_live(&c, &p, &flying, saved, now);
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Campaigns,
        &format!("Campaign {}", c.name),
        &format!("campaign:{}", c.id),
        before,
        live,
    ))
}

/// The brake's confirmation: what it will and will not be able to stop.
fn brake_question(
    c: &CampaignRecord,
    flying: &[(String, crate::server::store::TaskRecord, bool)],
) -> String {
    let no_cancel = flying
        .iter()
        .filter(|(_, t, _)| !crate::server::ota::commands::has_cancel(t.protocol))
        .count();
    let mut q = format!(
        "Brake: stop campaign {} and cancel the {} devices still upgrading?",
        c.name,
        flying.len()
    );
    if no_cancel > 0 {
        q.push_str(&format!(
            " {no_cancel} of them speak a protocol with no cancel message: their downloads are revoked, but one that already has the image may still install it (it will be shown as installed after the brake)."
        ));
    }
    q
}

fn detail_live(
    c: &CampaignRecord,
    p: &Progress,
    flying: &[(String, crate::server::store::TaskRecord, bool)],
    saved: u64,
    now: i64,
) -> Markup {
    let count = |k: &str| p.counts.get(k).copied().unwrap_or(0);
    html! {
        section.card {
            p #campaign-status { (badge(c.status.as_str())) " " (p.status_reason.as_deref().unwrap_or("")) }
            @if let Some(b) = &c.brake {
                p #brake-summary.notice {
                    b { "Brake: " } (crate::server::campaigns::brake_words(b))
                    @if p.installed_after_brake > 0 { "; " (p.installed_after_brake) " of them installed the new version anyway (counted as completed)" }
                    " (" (when(b.at_ms)) ")"
                }
            }
            div.tiles {
                div.tile { b { (p.total) } span { "devices" } }
                div.tile.good { b #count-completed { (count("completed")) } span { "completed" } }
                div.tile.busy { b #count-flying { (IN_FLIGHT.iter().map(|k| count(k)).sum::<u64>()) } span { "upgrading" } }
                div.tile.idle { b { (count("queued") + count("offline") + count("retrying")) } span { "waiting" } }
                div.tile.bad { b #count-failed { (count("failed")) } span { "failed" } }
                div.tile.warn { b { (count("cancelled") + count("skipped")) } span { "cancelled or skipped" } }
            }
            ol.waves #waves {
                @for w in &p.waves {
                    @let done = w.counts.get("completed").copied().unwrap_or(0);
                    li.wave data-wave=(w.wave) {
                        span.gate { (gate_words(w, c.success_threshold, p.current_wave, c.status)) }
                        (view::progress(pct(done, w.devices), &format!("{done} of {}", w.devices)))
                    }
                }
            }
            p {
                "Bytes: " (bytes(p.bytes_full)) " full images, " (bytes(p.bytes_delta)) " deltas, "
                (bytes(saved)) " saved by deltas"
                @if let Some(e) = p.eta_secs { " · about " (view::duration(e)) " to go" }
            }
        }
        section.card {
            h2 { "In flight (" (flying.len()) ")" }
            @if flying.is_empty() { p.muted { "nothing in flight" } } @else {
                table.inflight {
                    thead { tr { th { "Device" } th { "Stage" } th { "Progress" } th { "Last report" } } }
                    tbody {
                        @for (id, t, stale) in flying {
                            @let done = t.file_size * t.progress as u64 / 100;
                            tr.stale[*stale] {
                                td { a href=(format!("/devices/{}", seg(id))) { (id) } }
                                td { (badge(t.status.as_str())) @if *stale { " " (badge("stale")) } }
                                td { (view::progress(t.progress as f64, &format!("{} of {}", bytes(done), bytes(t.file_size)))) }
                                td { (ago(t.updated_at_ms, now)) }
                            }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Failures by error code" }
            @if p.failures.is_empty() { p.muted { "no failures" } }
            @for f in &p.failures {
                details.failure {
                    summary { b { (f.code) } " — " (f.devices.len()) " devices"
                        @if let Some(m) = &f.message { ": " span.message { (m) } } }
                    ul.devices { @for d in &f.devices { li { a href=(format!("/devices/{}", seg(d))) { (d) } } } }
                }
            }
            @if !p.retrying.is_empty() {
                h3 { "Retrying" }
                ul { @for r in &p.retrying { li { (r.device_id) ": attempt " (r.attempts + 1) " at " (when(r.next_attempt_ms)) " after " (r.last_error) } } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(wave: u32, devices: usize, counts: &[(&'static str, u64)]) -> WaveProgress {
        WaveProgress {
            wave,
            percent: 0.0,
            devices,
            counts: counts.iter().copied().collect(),
        }
    }

    #[test]
    fn gates_in_words() {
        let running = CampaignStatus::Running;
        let w = wave(2, 25, &[("completed", 24), ("downloading", 1)]);
        assert_eq!(
            gate_words(&w, 90.0, Some(2), running),
            "wave 2: 96 % ≥ 90 %, advancing"
        );
        let w = wave(2, 10, &[("completed", 5), ("downloading", 5)]);
        assert_eq!(
            gate_words(&w, 90.0, Some(2), running),
            "wave 2: 50 % < 90 %, in progress (5 upgrading)"
        );
        assert_eq!(
            gate_words(&w, 90.0, Some(1), running),
            "wave 2: waits for wave 1"
        );
        let w = wave(1, 10, &[("completed", 8), ("failed", 2)]);
        assert_eq!(
            gate_words(&w, 90.0, Some(2), CampaignStatus::Paused),
            "wave 1: 80 % < 90 %, held: below the gate"
        );
        assert_eq!(
            gate_words(&w, 50.0, None, running),
            "wave 1: 80 % ≥ 50 %, passed"
        );
    }
}
