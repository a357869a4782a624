//! Who may do what, checked on the server for every API route, and the audit log's writer.
//!
//! One table ([`rule`]) says, per method and route, the least role that may call it and, for a
//! change, the name it is audited under. [`guard`] authenticates (the admin token, or a console
//! session cookie), refuses what the role does not allow (403 with the envelope), checks CSRF on
//! every state-changing request made with a cookie (the session's token in `X-CSRF-Token` and a
//! same-origin `Origin`, or `Referer` when there is no `Origin`), runs the handler, and records
//! every change — allowed or refused — in the audit log before the answer leaves.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::server::accounts::{Principal, Via};
use crate::server::auth;
use crate::server::store::Role;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "hangar_session";
/// The header a session's state-changing request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The least role allowed.
    pub role: Role,
    /// The audit log's name for it; `None`: not a change (reads, dry runs).
    pub action: Option<&'static str>,
}

const fn read(role: Role) -> Rule {
    Rule { role, action: None }
}

const fn change(role: Role, action: &'static str) -> Rule {
    Rule {
        role,
        action: Some(action),
    }
}

/// The rule of `method` on the route `path` (axum's matched path, e.g.
/// `/api/ota/firmware/{version}/release`). A pair without a line in [`listed`] needs admin and
/// is audited as `unknown`, so a route added without a line here fails closed — reads too
/// (`tests/ops.rs` also demands a line for every route of the router).
pub fn rule(method: &Method, path: &str) -> Rule {
    listed(method, path).unwrap_or(change(Role::Admin, "unknown"))
}

/// The table: the rule of every API route and method that has one (HEAD as GET).
pub fn listed(method: &Method, path: &str) -> Option<Rule> {
    use Role::{Admin, Operator, Viewer};
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    Some(match (method, path) {
        ("GET", "/api/ota/firmware") => read(Viewer),
        ("GET", "/api/ota/firmware/latest") => read(Viewer),
        ("GET", "/api/ota/firmware/{version}") => read(Viewer),
        ("GET", "/api/ota/firmware/{version}/deltas") => read(Viewer),
        ("GET", "/api/ota/devices") => read(Viewer),
        ("GET", "/api/ota/devices/{id}") => read(Viewer),
        ("GET", "/api/ota/task/{device}") => read(Viewer),
        ("GET", "/api/ota/tasks") => read(Viewer),
        ("GET", "/api/ota/statistics") => read(Viewer),
        ("GET", "/api/ota/campaigns") => read(Viewer),
        ("GET", "/api/ota/campaigns/{id}") => read(Viewer),
        ("GET", "/api/site") => read(Viewer),
        ("GET", "/api/auth/session") => read(Viewer),
        ("GET", "/api/audit") => read(Viewer),
        ("GET", "/api/events") => read(Viewer),
        ("GET", "/metrics") => read(Viewer),
        ("GET", "/api/ota/backup") => change(Admin, "backup.download"),
        ("GET", "/api/reports") => change(Admin, "report.export"),
        ("GET", "/api/users") => read(Admin),
        ("GET", "/api/mqtt/users") => read(Admin),
        ("GET", "/api/mqtt/clients") => read(Viewer),
        ("POST", "/api/auth/logout") => change(Viewer, "auth.logout"),
        ("POST", "/api/ota/firmware/upload") => change(Operator, "firmware.upload"),
        ("POST", "/api/ota/firmware/{version}/release") => change(Operator, "firmware.release"),
        ("POST", "/api/ota/firmware/{version}/status") => change(Operator, "firmware.status"),
        ("DELETE", "/api/ota/firmware/{version}") => change(Operator, "firmware.delete"),
        ("POST", "/api/ota/firmware/{version}/deltas") => change(Operator, "delta.request"),
        ("POST", "/api/ota/upgrade/{device}") => change(Operator, "device.upgrade"),
        ("POST", "/api/ota/task/{device}/cancel") => change(Operator, "task.cancel"),
        ("POST", "/api/ota/tasks/archive") => change(Admin, "task.archive"),
        ("POST", "/api/ota/campaigns") => change(Operator, "campaign.create"),
        ("POST", "/api/ota/campaigns/dry-run") => read(Operator),
        ("POST", "/api/ota/campaigns/{id}/{action}") => change(Operator, "campaign.action"),
        ("POST", "/api/ota/devices") => change(Admin, "device.register"),
        ("POST", "/api/ota/devices/import") => change(Admin, "device.import"),
        ("PATCH", "/api/ota/devices/{id}") => change(Admin, "device.change"),
        ("DELETE", "/api/ota/devices/{id}") => change(Admin, "device.delete"),
        ("POST", "/api/ota/bundles") => change(Admin, "bundle.import"),
        ("POST", "/api/users") => change(Admin, "user.add"),
        ("PATCH", "/api/users/{name}") => change(Admin, "user.change"),
        ("DELETE", "/api/users/{name}") => change(Admin, "user.delete"),
        ("POST", "/api/mqtt/users") => change(Admin, "mqtt_user.add"),
        ("DELETE", "/api/mqtt/users/{name}") => change(Admin, "mqtt_user.delete"),
        _ => return None,
    })
}

/// The audit target of a request: the values of the route's parameters joined by `/`, with a
/// `deviceType` query parameter in front (`gateway/1.0.2`), or the campaign action after its id
/// (`c3/pause`).
pub fn target(route: &str, path: &str, query: Option<&str>) -> String {
    let mut parts: Vec<String> = route
        .split('/')
        .zip(path.split('/'))
        .filter(|(r, _)| r.starts_with('{'))
        .map(|(_, p)| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    if let Some(t) = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "deviceType")
            .map(|(_, v)| v.to_string())
    }) {
        parts.insert(0, t);
    }
    parts.join("/")
}

/// What a handler names as the target of its change when the path does not say it (an
/// upload's type and version, a new user's name): put into the response's extensions.
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

/// Marks `resp` with the audit target `t`.
pub fn with_target(mut resp: Response, t: impl Into<String>) -> Response {
    resp.extensions_mut().insert(AuditTarget(t.into()));
    resp
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request names where it comes from (an `Origin` or a `Referer` header).
pub fn claims_origin(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ORIGIN) || headers.contains_key(header::REFERER)
}

/// Whether the request's `Origin` (or, without one, its `Referer`) names the host it was sent
/// to: one rule for the sign-in and every state-changing API request. Without either, a cookie
/// request is refused: every browser sends `Origin` on a cross-origin POST and Chromium and
/// Firefox on same-origin ones too. The header is read by a URL parser (scheme http or https,
/// no user info), and its host and port compared with the request's authority.
pub fn same_origin(headers: &HeaderMap, authority: Option<&str>) -> bool {
    let Some(host) = authority.or_else(|| headers.get(header::HOST)?.to_str().ok()) else {
        return false;
    };
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(from) = from.and_then(|f| url::Url::parse(f).ok()) else {
        return false;
    };
    if !matches!(from.scheme(), "http" | "https")
        || !from.username().is_empty()
        || from.password().is_some()
    {
        return false;
    }
    let Some(from_host) = from.host_str() else {
        return false;
    };
    // the request's authority as a URL of the same scheme, so default ports compare equal
    let Ok(to) = url::Url::parse(&format!("{}://{host}/", from.scheme())) else {
        return false;
    };
    to.host_str()
        .is_some_and(|h| h.eq_ignore_ascii_case(from_host))
        && to.port_or_known_default() == from.port_or_known_default()
}

/// The same-origin path a sign-in may send the browser on to: `next` if, resolved against this
/// appliance, it stays on it (a path, not `//host`, `/\\host` or a scheme), else `/`. Decided by
/// a URL parser, the same way a browser resolves it.
pub fn safe_next(next: Option<&str>) -> String {
    const BASE: &str = "https://appliance.invalid/";
    let Some(next) = next.filter(|n| n.starts_with('/')) else {
        return "/".into();
    };
    // a browser drops tabs and newlines from URLs before resolving them
    if next.chars().any(|c| c.is_control()) {
        return "/".into();
    }
    let base = url::Url::parse(BASE).expect("a valid base");
    match base.join(next) {
        Ok(u) if u.origin() == base.origin() => {
            let mut out = u.path().to_string();
            if let Some(q) = u.query() {
                out.push('?');
                out.push_str(q);
            }
            if out.starts_with("//") || out.starts_with("/\\") {
                "/".into()
            } else {
                out
            }
        }
        _ => "/".into(),
    }
}

/// Authenticates a request: the admin token (`via` cli when `hangar` itself sends it), or a
/// live session cookie. `Ok(None)`: neither.
pub fn authenticate(st: &AppState, headers: &HeaderMap) -> Result<Option<Principal>, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth::bearer_matches(bearer, &st.admin_token) {
        let cli = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with("hangar-cli/"));
        return Ok(Some(Principal {
            actor: "admin-token".into(),
            via: if cli { Via::Cli } else { Via::Token },
            role: Role::Admin,
            csrf: None,
        }));
    }
    match cookie(headers, SESSION_COOKIE) {
        Some(c) => Ok(st.accounts.session(c)?.map(|(p, _)| p)),
        None => Ok(None),
    }
}

fn unauthenticated() -> Response {
    let mut resp = ApiError::unauthorized(
        "sign in at /login, or send Authorization: Bearer <token from <data_dir>/admin.token>",
    )
    .into_response();
    resp.extensions_mut()
        .insert(super::refusal::Unauthenticated);
    resp
}

/// Why a principal may not make this request, if it may not.
fn refusal(who: &Principal, rule: Rule, req: &Request) -> Option<ApiError> {
    if who.role < rule.role {
        return Some(ApiError::forbidden(format!(
            "{} has the {} role: this needs {}",
            who.actor,
            who.role.as_str(),
            rule.role.as_str()
        )));
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if who.via == Via::Session && !safe {
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let expected = who.csrf.as_deref().unwrap_or_default().as_bytes();
        let token_ok = !expected.is_empty() && bool::from(given.ct_eq(expected));
        let authority = req.uri().authority().map(|a| a.as_str());
        if !token_ok || !same_origin(req.headers(), authority) {
            return Some(
                ApiError::forbidden(
                    "cross-site request refused: a console request must come from the console \
                     page and carry its X-CSRF-Token (GET /api/auth/session)",
                )
                .with_code("CSRF"),
            );
        }
    }
    None
}

/// The access middleware of every `/api/...` route (see the module docs).
pub async fn guard(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let who = match authenticate(&st, req.headers()) {
        Ok(Some(p)) => p,
        Ok(None) => return unauthenticated(),
        Err(e) => return e.into_response(),
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let rule = rule(req.method(), &route);
    let target = rule
        .action
        .map(|_| target(&route, req.uri().path(), req.uri().query()));
    let resp = match refusal(&who, rule, &req) {
        Some(e) => e.into_response(),
        None => {
            req.extensions_mut().insert(who.clone());
            next.run(req).await
        }
    };
    let target = match resp.extensions().get::<AuditTarget>() {
        Some(AuditTarget(t)) if target.as_deref().is_some_and(str::is_empty) => Some(t.clone()),
        _ => target,
    };
    if let (Some(action), Some(target)) = (rule.action, target)
        && let Err(e) = st
            .accounts
            .audit(&who, action, &target, resp.status().as_u16())
            .await
    {
        // the change happened (or was refused) but cannot be recorded: say so loudly
        tracing::error!(error = %e, action, target, "the audit log could not be written");
        return ApiError::from(e).into_response();
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_per_route() {
        let post = Method::POST;
        assert_eq!(rule(&Method::GET, "/api/ota/devices").role, Role::Viewer);
        assert_eq!(rule(&Method::GET, "/api/ota/backup").role, Role::Admin);
        assert_eq!(rule(&Method::GET, "/api/users").role, Role::Admin);
        assert_eq!(
            rule(&post, "/api/ota/firmware/{version}/release"),
            change(Role::Operator, "firmware.release")
        );
        assert_eq!(
            rule(&Method::DELETE, "/api/ota/devices/{id}").role,
            Role::Admin
        );
        // a route nobody wrote a rule for is admin-only and audited, reads too
        assert_eq!(
            rule(&post, "/api/new/thing"),
            change(Role::Admin, "unknown")
        );
        assert_eq!(
            rule(&Method::GET, "/api/new/thing"),
            change(Role::Admin, "unknown")
        );
        assert_eq!(rule(&Method::HEAD, "/api/ota/tasks").role, Role::Viewer);
    }

    #[test]
    fn targets_come_from_the_route() {
        assert_eq!(
            target(
                "/api/ota/firmware/{version}/release",
                "/api/ota/firmware/1.0.2/release",
                Some("deviceType=gateway")
            ),
            "gateway/1.0.2"
        );
        assert_eq!(
            target(
                "/api/ota/campaigns/{id}/{action}",
                "/api/ota/campaigns/c3/pause",
                None
            ),
            "c3/pause"
        );
        assert_eq!(
            target(
                "/api/ota/upgrade/{device}",
                "/api/ota/upgrade/pk%2Fdn",
                None
            ),
            "pk/dn"
        );
        assert_eq!(
            target("/api/ota/firmware/upload", "/api/ota/firmware/upload", None),
            ""
        );
    }

    #[test]
    fn origin_must_name_the_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "10.0.0.5:8443".parse().unwrap());
        assert!(!same_origin(&h, None), "no Origin, no Referer");
        h.insert(header::ORIGIN, "https://10.0.0.5:8443".parse().unwrap());
        assert!(same_origin(&h, None));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h, None));
        h.remove(header::ORIGIN);
        h.insert(
            header::REFERER,
            "https://10.0.0.5:8443/campaigns".parse().unwrap(),
        );
        assert!(same_origin(&h, None));
        h.insert(
            header::REFERER,
            "https://10.0.0.5:8443.evil.example/".parse().unwrap(),
        );
        assert!(!same_origin(&h, None));
        for bad in [
            "https://10.0.0.5:8443@evil.example/",
            "https://evil.example/https://10.0.0.5:8443",
            "https://10.0.0.5:8444/",
            "ftp://10.0.0.5:8443/",
            "null",
        ] {
            h.insert(header::REFERER, bad.parse().unwrap());
            assert!(!same_origin(&h, None), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "box.local".parse().unwrap());
        h.insert(header::ORIGIN, "https://box.local:443".parse().unwrap());
        assert!(same_origin(&h, None), "default ports compare equal");
    }

    #[test]
    fn sign_in_goes_on_only_to_a_path_of_this_appliance() {
        for (next, to) in [
            (Some("/campaigns/c1?live=0"), "/campaigns/c1?live=0"),
            (Some("/"), "/"),
            (None, "/"),
            (Some("/\\evil.example"), "/"),
            (Some("/\\evil.example/x"), "/"),
            (Some("//evil.example"), "/"),
            (Some("/\t/evil.example"), "/"),
            (Some("/\n/evil.example"), "/"),
            (Some("https://evil.example/"), "/"),
            (Some("javascript:alert(1)"), "/"),
            (Some("evil.example"), "/"),
            (Some("/%2F%2Fevil.example"), "/%2F%2Fevil.example"),
            (Some("/a/../../x"), "/x"),
        ] {
            assert_eq!(safe_next(next), to, "{next:?}");
        }
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; hangar_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
