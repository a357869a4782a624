//! The web console: server-rendered pages (maud, compiled in, every value escaped), one small
//! script of our own (`assets/console.js`: forms to the JSON API with the CSRF header, upload
//! progress, the live event stream) and one stylesheet, all embedded with `include_bytes!`.
//! Nothing is fetched from anywhere else.
//!
//! Every page has a live region (`#live`). The script follows `GET /api/events`; when a batch
//! touches what the page shows (its `data-watch`), it fetches the page again with `?live=1`,
//! which answers that region alone, and swaps it in — at most one fetch at a time, so a busy
//! fleet costs a browser a few small requests a second.

mod admin;
mod broker;
mod campaigns;
mod firmware;
mod fleet;
mod view;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, html};

use super::AppState;
use super::access;
use crate::server::accounts::Principal;
use crate::server::store::Role;

/// The console's routes (pages and assets); the API is elsewhere.
pub fn router(state: AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/", get(fleet::page))
        .route("/devices/{id}", get(fleet::device))
        .route("/firmware", get(firmware::page))
        .route("/campaigns", get(campaigns::list))
        .route("/campaigns/new", get(campaigns::new))
        .route("/campaigns/{id}", get(campaigns::detail))
        .route("/statistics", get(admin::statistics))
        .route("/broker", get(broker::page))
        .route("/audit", get(admin::audit))
        .route("/users", get(admin::users))
        .route_layer(middleware::from_fn_with_state(state, signed_in));
    Router::new()
        .route("/login", get(login))
        .route("/assets/{file}", get(asset))
        .merge(pages)
}

/// Pages need a session (or the admin token); without one the browser goes to `/login`.
async fn signed_in(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    match access::authenticate(&st, req.headers()) {
        Ok(Some(p)) => {
            req.extensions_mut().insert(p);
            let mut resp = next.run(req).await;
            secure_headers(&mut resp);
            resp
        }
        Ok(None) => {
            let back = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let to = format!(
                "/login?next={}",
                percent_encoding::utf8_percent_encode(back, percent_encoding::NON_ALPHANUMERIC)
            );
            Redirect::to(&to).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Headers of every console page: no framing by other sites, scripts and styles only from the
/// appliance itself.
fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

const CSS: &[u8] = include_bytes!("assets/console.css");
const JS: &[u8] = include_bytes!("assets/console.js");
const ICON: &[u8] = include_bytes!("assets/icon.svg");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => {
            return super::error::ApiError::not_found(format!("no asset {file}")).into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The sign-in page. `next` (where the browser goes after signing in) is kept only if it is a
/// path of this appliance ([`access::safe_next`]); the script reads the checked value from the
/// form. While no user exists it says how to make the first one.
async fn login(
    State(st): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let next = access::safe_next(q.get("next").map(String::as_str));
    let first_run = !st.accounts.any_user().unwrap_or(true);
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head("Sign in")) }
            body.login {
                form #login-form.card method="post" action="/api/auth/login" data-next=(next) {
                    h1 { img src="/assets/icon.svg" alt="" width="28" height="28"; " Hangar" }
                    @if first_run {
                        div #first-run.notice role="note" {
                            p { strong { "No user exists yet." } " Create the first administrator on the appliance's box, in the directory it runs from:" }
                            pre { code { "hangar user add NAME --role admin" } }
                            p { "It asks for a password (or reads one with --password-file FILE). Then sign in here." }
                        }
                    }
                    label { "User name" input name="username" autocomplete="username" required maxlength="64" autofocus; }
                    label { "Password" input name="password" type="password" autocomplete="current-password" required maxlength="1024"; }
                    p #login-error.error role="alert" {}
                    button type="submit" { "Sign in" }
                }
                script src="/assets/console.js" {}
            }
        }
    };
    let mut resp = html_response(page);
    secure_headers(&mut resp);
    resp
}

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · Hangar" }
        link rel="icon" href="/assets/icon.svg";
        link rel="stylesheet" href="/assets/console.css";
    }
}

/// Which page a view is, for the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Fleet,
    Firmware,
    Campaigns,
    Statistics,
    Broker,
    Audit,
    Users,
}

/// The page around `content`. `watch` says which live changes refresh `#live`: `fleet`,
/// `device:ID`, `firmware`, `campaigns`, `campaign:ID`, `audit`; `every:MS` refreshes it on a
/// timer instead (the broker's figures change all the time).
fn shell(who: &Principal, nav: Nav, title: &str, watch: &str, content: Markup) -> Response {
    let link = |n: Nav, href: &str, label: &str| {
        html! { a href=(href) aria-current=[(n == nav).then_some("page")] { (label) } }
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body data-watch=(watch) data-role=(who.role.as_str()) {
                header.top {
                    a.brand href="/" { img src="/assets/icon.svg" alt="" width="22" height="22"; " Hangar" }
                    nav {
                        (link(Nav::Fleet, "/", "Fleet"))
                        (link(Nav::Firmware, "/firmware", "Firmware"))
                        (link(Nav::Campaigns, "/campaigns", "Campaigns"))
                        (link(Nav::Statistics, "/statistics", "Statistics"))
                        (link(Nav::Broker, "/broker", "Broker"))
                        (link(Nav::Audit, "/audit", "Audit"))
                        @if who.role == Role::Admin {
                            (link(Nav::Users, "/users", "Users"))
                            a #backup-link href="/api/ota/backup" download="hangar-backup.tar" title="everything needed to rebuild this appliance: store, images, certificates, token" { "Backup" }
                        }
                    }
                    span.who {
                        span #live-state title="live updates" { "●" }
                        " " (who.actor) " · " (who.role.as_str())
                        @if who.csrf.is_some() { " " button #logout.link type="button" { "Sign out" } }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
                div #toast role="status" aria-live="polite" {}
                script src="/assets/console.js" {}
            }
        }
    };
    html_response(page)
}

/// A page's answer: the whole page, or (`?live=1`) its live region alone.
fn answer(
    who: &Principal,
    live_only: bool,
    nav: Nav,
    title: &str,
    watch: &str,
    before: Markup,
    live: Markup,
) -> Response {
    let region = html! { div #live { (live) } };
    if live_only {
        return html_response(region);
    }
    shell(who, nav, title, watch, html! { (before) (region) })
}

/// A console page that cannot be shown (404 or 403), as a page.
fn refused(who: &Principal, status: StatusCode, message: &str) -> Response {
    let mut r = shell(
        who,
        Nav::Fleet,
        status.canonical_reason().unwrap_or("Refused"),
        "",
        html! { p.error { (message) } },
    );
    *r.status_mut() = status;
    r
}

/// Whether `?live=1` asked for the live region only.
fn live_only(q: &std::collections::HashMap<String, String>) -> bool {
    q.get("live").is_some_and(|v| v == "1")
}

/// A rendered page as an answer.
fn html_response(m: Markup) -> Response {
    axum::response::Html(m.into_string()).into_response()
}
