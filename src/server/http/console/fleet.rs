//! The fleet page (counts, versions per device type, the device table) and a device's page
//! (versions, single-device upgrade with a live progress bar, task timeline, last errors).

use std::collections::{BTreeMap, HashMap};

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};

use super::view::{self, ago, badge, bytes, seg, when, with_param};
use super::{AppState, Nav, answer, live_only, refused};
use crate::ids;
use crate::server::accounts::Principal;
use crate::server::store::{DeviceRecord, FirmwareStatus, Role, TaskRecord, TaskStatus};

/// Devices per page of the table.
pub const PAGE: usize = 50;

/// One device as the fleet shows it.
pub struct Row {
    /// The stored record.
    pub device: DeviceRecord,
    /// The version it runs (live, else stored).
    pub version: Option<String>,
    /// Connected now.
    pub online: bool,
    /// Last message or connection, ms.
    pub last_seen_ms: Option<i64>,
    /// Its newest task, in brief.
    pub task: Option<TaskBrief>,
    /// In flight with no report for longer than the stale limit.
    pub stale: bool,
}

/// What the fleet table shows of a device's newest task (not the whole record: a fleet's
/// worth of task histories would be megabytes per page view).
pub struct TaskBrief {
    /// Its status.
    pub status: TaskStatus,
    /// Its target.
    pub to_version: String,
    /// Percent.
    pub progress: u8,
}

/// Every device with what the fleet page needs.
pub fn rows(st: &AppState, now_ms: i64) -> Result<Vec<Row>, super::super::error::ApiError> {
    let devices = st.devices.list()?;
    let stale_ms = st.stale_secs as i64 * 1000;
    Ok(devices
        .into_iter()
        .map(|d| {
            let live = st.devices.live(&d.id);
            let task = st.store.latest_task(&d.id).ok().flatten();
            let stale = task.as_ref().is_some_and(|t| {
                t.status.is_active()
                    && t.start_time_ms.is_some()
                    && now_ms - t.updated_at_ms > stale_ms
            });
            let task = task.map(|t| TaskBrief {
                status: t.status,
                to_version: t.to_version,
                progress: t.progress,
            });
            Row {
                version: live
                    .version(d.firmware_version.as_deref())
                    .map(str::to_string),
                online: live.connections > 0,
                last_seen_ms: live.last_seen(d.last_seen_ms),
                task,
                stale,
                device: d,
            }
        })
        .collect())
}

/// The task state a row shows: `stale`, the task's status, or `none`.
pub fn task_state(r: &Row) -> &'static str {
    match &r.task {
        _ if r.stale => "stale",
        Some(t) => t.status.as_str(),
        None => "none",
    }
}

/// The filters, sort and page of the device table, from the query.
struct Table<'a> {
    q: &'a HashMap<String, String>,
}

impl Table<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.q.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn keeps(&self, r: &Row) -> bool {
        self.get("q")
            .is_none_or(|s| r.device.id.to_lowercase().contains(&s.to_lowercase()))
            && self.get("type").is_none_or(|t| r.device.device_type == t)
            && self
                .get("tag")
                .is_none_or(|t| r.device.tags.iter().any(|x| x == t))
            && self
                .get("version")
                .is_none_or(|v| r.version.as_deref() == Some(v))
            && self.get("online").is_none_or(|o| (o == "yes") == r.online)
            && self.get("task").is_none_or(|t| {
                task_state(r) == t
                    || (t == "active" && r.task.as_ref().is_some_and(|x| x.status.is_active()))
            })
    }

    fn sort(&self, rows: &mut [&Row]) {
        let key = self.get("sort").unwrap_or("id");
        match key {
            "version" => rows.sort_by(|a, b| {
                ids::compare_versions(
                    a.version.as_deref().unwrap_or(""),
                    b.version.as_deref().unwrap_or(""),
                )
                .then_with(|| a.device.id.cmp(&b.device.id))
            }),
            "lastSeen" => rows.sort_by_key(|r| std::cmp::Reverse(r.last_seen_ms)),
            "type" => rows.sort_by(|a, b| {
                (&a.device.device_type, &a.device.id).cmp(&(&b.device.device_type, &b.device.id))
            }),
            "task" => rows
                .sort_by(|a, b| (task_state(a), &a.device.id).cmp(&(task_state(b), &b.device.id))),
            _ => rows.sort_by(|a, b| a.device.id.cmp(&b.device.id)),
        }
        if self.get("dir") == Some("desc") {
            rows.reverse();
        }
    }

    fn page(&self) -> usize {
        self.get("page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1)
            .max(1)
    }
}

/// Per device type: devices per version, the newest release and how many could take a delta
/// to it.
struct TypeSummary {
    versions: BTreeMap<String, usize>,
    newest: Option<String>,
    on_newest: usize,
    delta_ready: usize,
    devices: usize,
}

fn summaries(st: &AppState, rows: &[Row]) -> BTreeMap<String, TypeSummary> {
    let released = st
        .firmware
        .list(None, Some(FirmwareStatus::Released))
        .unwrap_or_default();
    let mut newest: HashMap<String, String> = HashMap::new();
    for f in released {
        let e = newest
            .entry(f.device_type.clone())
            .or_insert_with(|| f.version.clone());
        if ids::compare_versions(&f.version, e).is_gt() {
            *e = f.version.clone();
        }
    }
    let mut out: BTreeMap<String, TypeSummary> = BTreeMap::new();
    for r in rows {
        let t = &r.device.device_type;
        let s = out.entry(t.clone()).or_insert_with(|| TypeSummary {
            versions: BTreeMap::new(),
            newest: newest.get(t).cloned(),
            on_newest: 0,
            delta_ready: 0,
            devices: 0,
        });
        s.devices += 1;
        let v = r.version.clone().unwrap_or_else(|| "unknown".into());
        *s.versions.entry(v.clone()).or_default() += 1;
        if let Some(n) = &s.newest {
            if &v == n {
                s.on_newest += 1;
            } else if r.device.delta_formats.iter().any(|f| f == "bsdiff40")
                && st.deltas.offer(t, &v, n).is_some()
            {
                s.delta_ready += 1;
            }
        }
    }
    out
}

/// GET / — the fleet.
pub async fn page(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, super::super::error::ApiError> {
    let now = crate::time::now_ms();
    let st2 = st.clone();
    let all = tokio::task::spawn_blocking(move || rows(&st2, now))
        .await
        .map_err(super::super::error::ApiError::internal)??;
    let online = all.iter().filter(|r| r.online).count();
    let stale = all.iter().filter(|r| r.stale).count();
    let in_flight = all
        .iter()
        .filter(|r| r.task.as_ref().is_some_and(|t| t.status.is_active()))
        .count();
    let table = Table { q: &q };
    let mut shown: Vec<&Row> = all.iter().filter(|r| table.keeps(r)).collect();
    table.sort(&mut shown);
    let total = shown.len();
    let pages = total.div_ceil(PAGE).max(1);
    let page = table.page().min(pages);
    let types = summaries(&st, &all);
    let live = html! {
        section.tiles {
            div.tile { b { (all.len()) } span { "devices" } }
            div.tile.good { b #count-online { (online) } span { "online" } }
            div.tile.bad { b #count-offline { (all.len() - online) } span { "offline" } }
            div.tile.warn title=(format!("in flight with no report for over {} s", st.stale_secs)) { b #count-stale { (stale) } span { "stale" } }
            div.tile.busy { b #count-inflight { (in_flight) } span { "upgrading" } }
        }
        section.types {
            @for (t, s) in &types {
                @let rows: Vec<(String, f64, String)> = s.versions.iter().map(|(v, n)| (v.clone(), *n as f64, n.to_string())).collect();
                div.card {
                    h2 { (t) }
                    p {
                        (s.devices) " devices · "
                        @match &s.newest {
                            Some(n) => { "newest release " b { (n) } ": " (s.on_newest) " on it, " (s.delta_ready) " could take a delta to it" }
                            None => { "no release yet" }
                        }
                    }
                    (view::bar_chart(&format!("versions of {t}"), &rows))
                }
            }
        }
        (device_table(&q, &shown, page, pages, total, now))
    };
    let known: Vec<String> = types.keys().cloned().collect();
    let filters = html! {
        (filters_form(&q, &known))
        @if who.role >= Role::Admin { (register_form(&st, &known)) }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Fleet,
        "Fleet",
        "fleet",
        filters,
        live,
    ))
}

/// An admin's form to register a device: its type picked from the known ones (firmware and
/// devices), or a new one typed in.
fn register_form(st: &AppState, device_types: &[String]) -> Markup {
    let mut known: std::collections::BTreeSet<String> = device_types.iter().cloned().collect();
    for f in st.firmware.list(None, None).unwrap_or_default() {
        known.insert(f.device_type);
    }
    html! {
        details.card #register {
            summary { "Register a device" }
            form.api-form #register-form data-url="/api/ota/devices" data-done="device registered" {
                div.row {
                    label { "Id " input name="id" required maxlength="128" placeholder="GW7 or productKey/deviceName"; }
                    label { "Protocol "
                        select name="protocol" { option value="gateway" { "gateway" } option value="alibaba" { "alibaba" } }
                    }
                    label { "Device type " input name="deviceType" maxlength="64" list="known-types" placeholder="gateway" title="pick a known type or type a new one (Alibaba: the productKey)"; }
                    datalist #known-types { @for t in &known { option value=(t) {} } }
                }
                div.row {
                    label { "Secret (its MQTT password) " input name="secret" type="password" required minlength="8" maxlength="256" autocomplete="new-password"; }
                    label { "Tags " input name="tags" data-list="" placeholder="line-3, hall-a" maxlength="1000"; }
                    button type="submit" { "Register" }
                }
            }
        }
    }
}

fn filters_form(q: &HashMap<String, String>, types: &[String]) -> Markup {
    let v = |k: &str| q.get(k).cloned().unwrap_or_default();
    let sel = |k: &str, val: &str| q.get(k).is_some_and(|x| x == val);
    html! {
        form.filters method="get" action="/" {
            input name="q" placeholder="device id contains" value=(v("q")) maxlength="128";
            select name="type" {
                option value="" { "every type" }
                @for t in types { option value=(t) selected[sel("type", t)] { (t) } }
            }
            input name="tag" placeholder="tag" value=(v("tag")) maxlength="64";
            input name="version" placeholder="version" value=(v("version")) maxlength="64";
            select name="online" {
                option value="" { "online or not" }
                option value="yes" selected[sel("online", "yes")] { "online" }
                option value="no" selected[sel("online", "no")] { "offline" }
            }
            select name="task" {
                option value="" { "any task state" }
                @for s in ["active", "stale", "pending", "downloading", "verifying", "installing", "completed", "failed", "cancelled", "none"] {
                    option value=(s) selected[sel("task", s)] { (s) }
                }
            }
            @if let Some(s) = q.get("sort") { input type="hidden" name="sort" value=(s); }
            @if let Some(d) = q.get("dir") { input type="hidden" name="dir" value=(d); }
            button type="submit" { "Filter" }
            a href="/" { "clear" }
        }
    }
}

fn device_table(
    q: &HashMap<String, String>,
    rows: &[&Row],
    page: usize,
    pages: usize,
    total: usize,
    now: i64,
) -> Markup {
    let head = |key: &str, label: &str| {
        let desc =
            q.get("sort").is_some_and(|s| s == key) && q.get("dir").is_none_or(|d| d != "desc");
        let mut q2 = q.clone();
        q2.insert("sort".into(), key.into());
        let href = with_param("/", &q2, "dir", if desc { "desc" } else { "" });
        html! { th { a href=(href) { (label) } } }
    };
    let page_link = |p: usize| {
        let mut q2 = q.clone();
        q2.remove("page");
        let base = with_param("/", &q2, "page", "");
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}page={p}")
    };
    html! {
        p.muted #device-count { (total) " devices match" }
        table.devices {
            thead { tr {
                (head("id", "Device")) (head("type", "Type")) (head("version", "Version"))
                th { "Tags" } th { "Online" } (head("lastSeen", "Last seen")) (head("task", "Task"))
            } }
            tbody {
                @for r in rows.iter().skip((page - 1) * PAGE).take(PAGE) {
                    tr {
                        td { a href=(format!("/devices/{}", seg(&r.device.id))) { (r.device.id) } }
                        td { (r.device.device_type) }
                        td { (r.version.as_deref().unwrap_or("?")) }
                        td { @for t in &r.device.tags { span.tag { (t) } " " } }
                        td { @if r.online { (badge("online")) } @else { (badge("offline")) } }
                        td { @if let Some(s) = r.last_seen_ms { span title=(when(s)) { (ago(s, now)) } } @else { "never" } }
                        td {
                            @if let Some(t) = &r.task {
                                (badge(task_state(r))) " → " (t.to_version)
                                @if t.status.is_active() { " " (view::progress(t.progress as f64, &format!("{} %", t.progress))) }
                            } @else { span.muted { "—" } }
                        }
                    }
                }
            }
        }
        nav.pages {
            @if page > 1 { a href=(page_link(page - 1)) { "← previous" } " " }
            "page " (page) " of " (pages)
            @if page < pages { " " a href=(page_link(page + 1)) { "next →" } }
        }
    }
}

/// GET /devices/{id}
pub async fn device(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, super::super::error::ApiError> {
    let Ok(d) = st.devices.get(&id) else {
        return Ok(refused(
            &who,
            StatusCode::NOT_FOUND,
            &format!("no device {id}"),
        ));
    };
    let now = crate::time::now_ms();
    let live = st.devices.live(&d.id);
    let version = live
        .version(d.firmware_version.as_deref())
        .map(str::to_string);
    let online = live.connections > 0;
    let (tasks, _) = st.store.list_tasks(|t| t.device_id == d.id, 20, 0)?;
    let released: Vec<_> = st
        .firmware
        .list(Some(&d.device_type), Some(FirmwareStatus::Released))
        .unwrap_or_default();
    let current = tasks.first();
    let errors: Vec<&TaskRecord> = tasks
        .iter()
        .filter(|t| t.error_code.is_some())
        .take(5)
        .collect();
    let stale_ms = st.stale_secs as i64 * 1000;
    let before = html! {
        section.card {
            dl.facts {
                dt { "Type" } dd { (d.device_type) }
                dt { "Protocol" } dd { (d.protocol.as_str()) }
                dt { "Tags" } dd { @for t in &d.tags { span.tag { (t) } " " } }
                dt { "Address" } dd { (d.last_ip.as_deref().unwrap_or("—")) }
                dt { "Delta formats" } dd { (d.delta_formats.join(", ")) }
            }
            @if who.role >= Role::Operator {
                form #upgrade-form.inline data-device=(d.id) {
                    label { "Upgrade to "
                        select name="version" required {
                            @for f in &released { option value=(f.version) { (f.version) " (" (bytes(f.size)) ")" } }
                        }
                    }
                    label { input type="checkbox" name="force"; " force" }
                    button type="submit" disabled[released.is_empty()] { "Upgrade" }
                    @if current.is_some_and(|t| t.status.is_active()) {
                        " " button #cancel-task.danger type="button" data-device=(d.id) { "Cancel the task" }
                    }
                }
            }
            @if who.role >= Role::Admin {
                form.api-form.inline #tag-form data-method="PATCH" data-url=(format!("/api/ota/devices/{}", seg(&d.id))) data-done="tags changed" {
                    label { "Add tags " input name="addTags" data-list="" placeholder="line-3, hall-a" maxlength="1000"; }
                    label { "remove tags " input name="removeTags" data-list="" placeholder="line-2" maxlength="1000"; }
                    button type="submit" { "Change tags" }
                }
                p { button.act.danger type="button" data-method="DELETE" data-post=(format!("/api/ota/devices/{}", seg(&d.id)))
                    data-confirm=(format!("Delete device {} from the registry?", d.id)) { "Delete the device" } }
            }
        }
    };
    let live_region = html! {
        section.card {
            dl.facts {
                dt { "Version" } dd #device-version { (version.as_deref().unwrap_or("unknown")) }
                dt { "Target" } dd #device-target { (current.filter(|t| t.status.is_active()).map_or("—", |t| t.to_version.as_str())) }
                dt { "Online" } dd { @if online { (badge("online")) } @else { (badge("offline")) } }
                dt { "Last seen" } dd { @if let Some(s) = live.last_seen(d.last_seen_ms) { (ago(s, now)) " (" (when(s)) ")" } @else { "never" } }
            }
            @if let Some(t) = current {
                @let stale = t.status.is_active() && t.start_time_ms.is_some() && now - t.updated_at_ms > stale_ms;
                h2 { "Task " (t.id) ": " (t.from_version.as_deref().unwrap_or("?")) " → " (t.to_version) " " (badge(if stale { "stale" } else { t.status.as_str() })) }
                div #task-progress {
                    (view::progress(t.progress as f64, &format!("{} % of {}", t.progress, bytes(t.file_size))))
                }
                @if let Some(c) = &t.campaign_id { p { "part of campaign " a href=(format!("/campaigns/{}", seg(c))) { (c) } } }
                @if let Some(dl) = &t.delta { p { "delta from " (dl.from_version) ", " (bytes(dl.size)) } }
                h3 { "Timeline" }
                ol.timeline {
                    @for e in t.events.iter().rev() {
                        li {
                            time { (when(e.at_ms)) } " " (badge(e.status.as_str())) " " (e.progress) " %"
                            // "downloading 40%" says again what the badge and the number say
                            @if e.note != format!("{} {}%", e.status.as_str(), e.progress) { " — " (e.note) }
                        }
                    }
                }
            } @else {
                p.muted { "no task yet" }
            }
        }
        @if !errors.is_empty() {
            section.card {
                h2 { "Last errors" }
                ul {
                    @for t in &errors {
                        li { (when(t.updated_at_ms)) " — task " (t.id) " to " (t.to_version) ": "
                            b { (t.error_code.as_deref().unwrap_or("")) } " " (t.error_message.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        section.card {
            h2 { "Earlier tasks" }
            table {
                thead { tr { th { "Task" } th { "From" } th { "To" } th { "State" } th { "Created" } } }
                tbody {
                    @for t in tasks.iter().skip(1) {
                        tr { td { (t.id) } td { (t.from_version.as_deref().unwrap_or("?")) } td { (t.to_version) } td { (badge(t.status.as_str())) } td { (when(t.created_at_ms)) } }
                    }
                }
            }
        }
    };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Fleet,
        &format!("Device {}", d.id),
        &format!("device:{}", d.id),
        before,
        live_region,
    ))
}
