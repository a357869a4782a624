//! Statistics (rates and durations per version and campaign, traffic, charts), the audit log
//! and, for admins, the users.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::view::{self, badge, bytes, when};
use super::{AppState, Nav, answer, live_only, refused};
use crate::server::accounts::{AuditFilter, Principal};
use crate::server::store::Role;

type ApiResult = Result<Response, super::super::error::ApiError>;

/// GET /statistics
pub async fn statistics(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let st2 = st.clone();
    let s = tokio::task::spawn_blocking(move || st2.ota.statistics())
        .await
        .map_err(super::super::error::ApiError::internal)??;
    let traffic = st.traffic.summary();
    let rate_rows = |m: &std::collections::BTreeMap<String, crate::server::ota::Stats>| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.success_rate,
                    format!(
                        "{:.0} % of {} ({} failed)",
                        v.success_rate, v.total, v.failed
                    ),
                )
            })
            .collect::<Vec<_>>()
    };
    let duration_rows: Vec<_> = s
        .by_version
        .iter()
        .filter_map(|(k, v)| {
            v.avg_duration_secs
                .map(|d| (k.clone(), d, view::duration(d as u64)))
        })
        .collect();
    let traffic_rows: Vec<_> = traffic
        .per_firmware
        .iter()
        .map(|f| {
            (
                format!("{} {}", f.device_type, f.version),
                (f.bytes_full + f.bytes_delta) as f64,
                format!(
                    "{} full, {} delta, {} saved",
                    bytes(f.bytes_full),
                    bytes(f.bytes_delta),
                    bytes(f.bytes_saved)
                ),
            )
        })
        .collect();
    // campaigns by their names (the id where a campaign is gone)
    let names: HashMap<String, String> = st
        .campaigns
        .list()?
        .into_iter()
        .map(|c| (c.id, c.name))
        .collect();
    let campaign_rows: Vec<_> = rate_rows(&s.by_campaign)
        .into_iter()
        .map(|(id, v, text)| {
            let label = match names.get(&id) {
                Some(n) => format!("{n} ({id})"),
                None => id,
            };
            (label, v, text)
        })
        .collect();
    let a = &s.all;
    let live = html! {
        section.tiles {
            div.tile { b { (a.total) } span { "upgrades" } }
            div.tile.good { b { (format!("{:.1} %", a.success_rate)) } span { "succeeded" } }
            div.tile.bad { b { (format!("{:.1} %", a.failure_rate)) } span { "failed" } }
            div.tile { b { (a.avg_duration_secs.map_or("—".into(), |d| view::duration(d as u64))) } span { "average duration" } }
            div.tile { b { (bytes(traffic.bytes_full + traffic.bytes_delta)) } span { "downloaded" } }
            div.tile.good { b { (bytes(traffic.bytes_saved)) } span { "saved by deltas" } }
        }
        div.charts {
            (view::bar_chart("success rate per target version", &rate_rows(&s.by_version)))
            (view::bar_chart("success rate per campaign", &campaign_rows))
            (view::bar_chart("average duration per target version", &duration_rows))
            (view::bar_chart("download traffic per firmware", &traffic_rows))
        }
        p.muted { (s.devices) " devices, " (s.online_devices) " online; " (traffic.requests) " downloads, " (traffic.range_requests) " of them resumed with Range" }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Statistics,
        "Statistics",
        "campaigns",
        html! {},
        live,
    ))
}

/// GET /audit?actor&action&page
pub async fn audit(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    const PER_PAGE: usize = 100;
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let filter = AuditFilter {
        actor: get("actor"),
        action: get("action"),
        since_ms: None,
    };
    let page: usize = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let (entries, total) = st
        .accounts
        .audit_log(&filter, PER_PAGE, (page - 1) * PER_PAGE)?;
    let before = html! {
        form.filters method="get" action="/audit" {
            input name="actor" placeholder="who" value=(get("actor").unwrap_or_default()) maxlength="64";
            input name="action" placeholder="action, or a prefix like campaign." value=(get("action").unwrap_or_default()) maxlength="64";
            button type="submit" { "Filter" }
            a href="/audit" { "clear" }
        }
    };
    let live = html! {
        p.muted { (total) " entries" }
        table.audit {
            thead { tr { th { "#" } th { "When" } th { "Who" } th { "Via" } th { "Action" } th { "Target" } th { "Result" } } }
            tbody {
                @for e in &entries {
                    tr {
                        td { (e.seq) } td { (when(e.at_ms)) } td { (e.actor) } td { (e.via) }
                        td { (e.action) } td { (e.target) }
                        td {
                            @if e.result == "ok" { (badge("ok")) }
                            @else if e.status == 0 { (e.result) }
                            @else { (badge("failed")) " " (e.result) }
                        }
                    }
                }
            }
        }
        nav.pages {
            @if page > 1 { a href=(format!("/audit?page={}", page - 1)) { "← newer" } " " }
            "page " (page)
            @if page * PER_PAGE < total { " " a href=(format!("/audit?page={}", page + 1)) { "older →" } }
        }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Audit,
        "Audit log",
        "audit",
        before,
        live,
    ))
}

/// GET /users (admin)
pub async fn users(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    if who.role < Role::Admin {
        return Ok(refused(
            &who,
            StatusCode::FORBIDDEN,
            "managing users needs the admin role",
        ));
    }
    let users = st.accounts.list()?;
    let before = html! {
        p { a.button href="/api/ota/backup" download="hangar-backup.tar" { "Download a backup" }
            " " span.muted { "(the store, images, certificates and token: keep it safe)" } }
        form #user-form.card.inline {
            h2 { "Add a user" }
            input name="name" placeholder="name" required maxlength="64" pattern="[A-Za-z0-9_.\\-]{1,64}";
            select name="role" { option value="viewer" { "viewer" } option value="operator" { "operator" } option value="admin" { "admin" } }
            input name="password" type="password" placeholder="password (8 or more)" required minlength="8" maxlength="1024" autocomplete="new-password";
            button type="submit" { "Add" }
        }
    };
    let live = html! {
        table.users {
            thead { tr { th { "Name" } th { "Role" } th { "Created" } th { "Password changed" } th { "Actions" } } }
            tbody {
                @for u in &users {
                    tr {
                        td { (u.name) } td { (u.role.as_str()) } td { (when(u.created_at_ms)) } td { (when(u.password_changed_at_ms)) }
                        td {
                            form.user-change.inline data-user=(u.name) {
                                select name="role" {
                                    @for r in Role::ALL { option value=(r.as_str()) selected[r == u.role] { (r.as_str()) } }
                                }
                                input name="password" type="password" placeholder="new password" minlength="8" maxlength="1024" autocomplete="new-password";
                                button type="submit" { "Change" }
                            }
                            " " button.act.danger type="button" data-method="DELETE" data-post=(format!("/api/users/{}", u.name))
                                data-confirm=(format!("Delete user {} and end their sessions?", u.name)) { "Delete" }
                        }
                    }
                }
            }
        }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Users,
        "Users",
        "",
        before,
        live,
    ))
}
