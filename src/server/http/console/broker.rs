//! The "Broker" page: the site broker at a glance — connected clients (devices, application
//! users, anonymous), subscriptions, retained messages, messages per second, drops by reason,
//! the deepest queues — and, for admins, the application users.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::view::{self, bytes, when};
use super::{AppState, Nav, answer, live_only};
use crate::server::accounts::Principal;
use crate::server::broker::router::Identity;
use crate::server::broker::users::Source;
use crate::server::store::Role;

type ApiResult = Result<Response, super::super::error::ApiError>;

/// Clients listed per page.
const PER_PAGE: usize = 100;

/// GET /broker?kind&page
pub async fn page(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let b = &st.broker;
    let z = b.router.sizes();
    let (rate_in, rate_out) = b.rates.get();
    let kind = q.get("kind").filter(|k| !k.is_empty()).cloned();
    let page: usize = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut clients = b.router.clients();
    let mut deepest: Vec<_> = clients
        .iter()
        .filter(|c| c.queued + c.inflight > 0)
        .map(|c| {
            (
                c.client_id.clone(),
                c.identity.owner(),
                c.queued,
                c.inflight,
            )
        })
        .collect();
    deepest.sort_by_key(|d| std::cmp::Reverse(d.2 + d.3));
    deepest.truncate(10);
    clients.retain(|c| kind.as_deref().is_none_or(|k| c.identity.kind() == k));
    let total = clients.len();
    let shown: Vec<_> = clients
        .into_iter()
        .skip((page - 1) * PER_PAGE)
        .take(PER_PAGE)
        .collect();
    let c = &b.counters;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let drops = [
        ("refused by the ACL or the OTA rules", g(&c.acl_denied)),
        ("queue full", g(&c.dropped_queue_full)),
        ("not retained: limit", g(&c.dropped_retained_limit)),
        ("subscription limit", g(&c.subscriptions_refused)),
        ("packet too large", g(&c.dropped_too_large)),
        ("protocol error", g(&c.protocol_errors)),
        ("login refused", g(&c.auth_failures)),
    ];
    let kinds = z.connected_by_kind;
    let count = |k: &str| kinds.iter().find(|x| x.0 == k).map_or(0, |x| x.1);
    let link = |k: &str| view::with_param("/broker", &q, "kind", k);
    let external = st.external.as_ref().map(|x| {
        (
            x.url().to_string(),
            x.state(),
            x.dynsec.as_ref().map(|d| (d.state(), d.queued())),
        )
    });
    let live = html! {
        @if let Some((url, link, sync)) = &external {
            section #site-broker {
                h2 { "Site broker" }
                p {
                    "Devices connect to the site's broker at " code { (url) } "; Hangar is its client. "
                    @if link.connected {
                        b.ok { "Connected" } " since " (when(link.since_ms)) "."
                    } @else {
                        b.bad { "Not connected" } " since " (when(link.since_ms)) ": " (link.error.as_deref().unwrap_or("connecting")) ". Hangar keeps retrying."
                    }
                    @if let (true, Some(e)) = (link.connected, &link.error) {
                        " " b.bad { (e) }
                    }
                }
                @if let Some((s, queued)) = sync {
                    p {
                        "Device accounts are kept in mosquitto's dynamic security: "
                        (queued) " change(s) waiting for the broker, "
                        (s.missing) " registered device(s) without an account (set their secret again)."
                        @if let Some(e) = &s.error { " " b.bad { (e) } }
                    }
                }
                p.muted { "The figures below are the built-in broker's, which carries nothing in this mode." }
            }
        }
        @if !st.broker.bridges.list.is_empty() {
            section #bridges {
                h2 { "Bridges" }
                table.bridges {
                    thead { tr { th { "Bridge" } th { "Broker" } th { "Out" } th { "In" } th { "Waiting on disk" } th { "Forwarded" } th { "Received" } th { "Dropped (queue full)" } th { "Last error" } } }
                    tbody {
                        @for b in &st.broker.bridges.list {
                            @let s = &b.stats;
                            tr {
                                td { (b.settings.name) }
                                td { code { (b.settings.url) } }
                                td { @if s.out_up.load(Ordering::Relaxed) { b.ok { "up" } } @else { b.bad { "down" } } }
                                td { @if s.in_up.load(Ordering::Relaxed) { b.ok { "up" } } @else { b.bad { "down" } } }
                                td.num { (g(&s.queued)) }
                                td.num { (g(&s.forwarded)) }
                                td.num { (g(&s.received)) }
                                td.num { (g(&s.dropped)) }
                                td { (s.error.lock().expect("bridge error").clone().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
        section.tiles {
            div.tile { b #broker-clients { (z.connected) } span { "connected clients" } }
            div.tile { b { (count("device")) } span { "devices" } }
            div.tile { b { (count("user")) } span { "application users" } }
            div.tile { b { (count("anonymous")) } span { "anonymous" } }
            div.tile { b { (z.subscriptions) } span { "subscriptions" } }
            div.tile { b #broker-retained { (z.retained) } span { "retained (" (bytes(z.retained_bytes as u64)) ")" } }
            div.tile { b { (format!("{rate_in:.0}")) } span { "messages in / s" } }
            div.tile { b { (format!("{rate_out:.0}")) } span { "messages out / s" } }
            div.tile { b { (z.queued) } span { "queued" } }
            div.tile { b { (z.stored) } span { "sessions kept offline" } }
        }
        div.columns {
            section {
                h2 { "Drops and refusals" }
                table.drops {
                    tbody {
                        @for (what, n) in drops {
                            tr { td { (what) } td.num { (n) } }
                        }
                    }
                }
            }
            section {
                h2 { "Deepest queues" }
                @if deepest.is_empty() {
                    p.muted { "every client is keeping up" }
                } @else {
                    table.queues {
                        thead { tr { th { "Client" } th { "Who" } th { "Queued" } th { "In flight" } } }
                        tbody {
                            @for (id, owner, queued, inflight) in &deepest {
                                tr { td { (id) } td { (owner) } td.num { (queued) } td.num { (inflight) } }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Connected clients" }
        nav.filters {
            a href=(link("")) aria-current=[kind.is_none().then_some("page")] { "all" }
            @for k in ["device", "user", "anonymous"] {
                " " a href=(link(k)) aria-current=[(kind.as_deref() == Some(k)).then_some("page")] { (k) }
            }
            span.muted { " " (total) " clients" }
        }
        table #broker-client-table.clients {
            thead { tr { th { "Client id" } th { "Kind" } th { "Who" } th { "Address" } th { "Since" } th { "Subscriptions" } th { "Queued" } th { "Session" } } }
            tbody {
                @for cl in &shown {
                    tr {
                        td { (cl.client_id) }
                        td { (cl.identity.kind()) }
                        td {
                            @match &cl.identity {
                                Identity::Device { id, .. } => a href=(format!("/devices/{}", view::seg(id))) { (id) },
                                Identity::User(n) => (n),
                                Identity::Anonymous => span.muted { "—" },
                            }
                        }
                        td { (cl.peer) }
                        td { (when(cl.since_ms)) }
                        td {
                            @for (i, (f, qos)) in cl.subscriptions.iter().take(5).enumerate() {
                                @if i > 0 { ", " }
                                code { (f) } sub { (qos) }
                            }
                            @if cl.subscriptions.len() > 5 { " and " (cl.subscriptions.len() - 5) " more" }
                        }
                        td.num { (cl.queued + cl.inflight) }
                        td { @if cl.persistent { "kept" } @else { "clean" } }
                    }
                }
            }
        }
        nav.pages {
            @if page > 1 { a href=(view::with_param("/broker", &q, "page", &(page - 1).to_string())) { "← previous" } " " }
            "page " (page)
            @if page * PER_PAGE < total { " " a href=(view::with_param("/broker", &q, "page", &(page + 1).to_string())) { "next →" } }
        }
    };
    let admin = who.role == Role::Admin;
    let users = if admin { b.users.list() } else { Vec::new() };
    let before = if admin {
        html! {
            details.card #mqtt-users {
                summary { "Add an application user" }
                p.muted { "MQTT clients that are not devices: SCADA, historians, dashboards. What they may publish and read is the ACL file's business (mqtt.acl_file)." }
                form #mqtt-user-form.api-form.inline data-url="/api/mqtt/users" data-done="MQTT user added" {
                    input name="name" placeholder="user name" required maxlength="64" pattern="[A-Za-z0-9_.@\\-]{1,64}";
                    input name="password" type="password" placeholder="password" required maxlength="1024" autocomplete="new-password";
                    button type="submit" { "Add" }
                }
            }
        }
    } else {
        html! {}
    };
    let users_table = html! {
        @if admin {
            h2 { "Application users (" (users.len()) ")" }
            table #mqtt-user-table.users {
                thead { tr { th { "Name" } th { "From" } th { "Created" } th { "" } } }
                tbody {
                    @for u in &users {
                        tr {
                            td { (u.name) }
                            td { @match u.source {
                                Source::Store => "hangar",
                                Source::File => "password file",
                            } }
                            td { (u.created_at_ms.map(when).unwrap_or_default()) }
                            td {
                                @if u.source == Source::Store {
                                    button.act.danger type="button" data-method="DELETE" data-post=(format!("/api/mqtt/users/{}", view::seg(&u.name)))
                                        data-confirm=(format!("Delete MQTT user {} and close its connections?", u.name)) { "Delete" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let live = html! { (live) (users_table) };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Broker,
        "Broker",
        "every:2000",
        before,
        live,
    ))
}
