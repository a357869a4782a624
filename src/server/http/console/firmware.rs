//! The firmware page: upload (streamed, with a progress bar), release / deprecate, the deltas
//! of each release with sizes, ratios and state, and asking for one.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;

use super::view::{badge, bytes, when};
use super::{AppState, Nav, answer, live_only};
use crate::server::accounts::Principal;
use crate::server::store::{DeltaStatus, FirmwareStatus, Role};

/// GET /firmware
pub async fn page(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, super::super::error::ApiError> {
    let list = st.firmware.list(None, None)?;
    let deltas = st.store.list_deltas(None)?;
    // the device types the appliance knows (its firmware's and its devices'), to pick from
    let types: std::collections::BTreeSet<String> = list
        .iter()
        .map(|f| f.device_type.clone())
        .chain(st.devices.list()?.into_iter().map(|d| d.device_type))
        .collect();
    let operator = who.role >= Role::Operator;
    let before = html! {
        @if operator {
            form #upload-form.card enctype="multipart/form-data" {
                h2 { "Upload a firmware" }
                div.row {
                    label { "Image " input type="file" name="file" required; }
                    label { "Version " input name="version" required maxlength="64" pattern="[0-9A-Za-z.+\\-]{1,64}" placeholder="1.0.2"; }
                    label { "Device type " input name="deviceType" value="gateway" maxlength="64" pattern="[A-Za-z0-9_\\-]{1,64}" list="device-types" title="pick a known type or type a new one"; }
                    datalist #device-types { @for t in &types { option value=(t) {} } }
                }
                label { "Signature (.minisig, optional) " input type="file" name="signature" accept=".minisig"; }
                label { "Description " input name="description" maxlength="4096"; }
                label { input type="checkbox" name="forceUpgrade" value="true"; " force upgrade" }
                div.row {
                    button type="submit" { "Upload" }
                    progress #upload-progress value="0" max="100" hidden {}
                    span #upload-state.barlabel {}
                }
            }
        }
    };
    let sigs = &st.signatures;
    let live = html! {
        @if !sigs.require_signed {
            p.card.warning #unsigned-warning {
                "Signatures are not required: unsigned firmware can be released ([trust] require_signed = false)."
            }
        }
        table.firmware {
            thead { tr {
                th { "Type" } th { "Version" } th { "State" } th { "Signature" } th { "Size" } th { "Description" }
                th { "Uploaded" } th { "Deltas to it" } @if operator { th { "Actions" } }
            } }
            tbody {
                @for f in &list {
                    @let to_it: Vec<_> = deltas.iter().filter(|d| d.device_type == f.device_type && d.to_version == f.version).collect();
                    tr data-version=(f.version) data-type=(f.device_type) {
                        td { (f.device_type) }
                        td { b { (f.version) } }
                        td { (badge(f.status.as_str())) }
                        @let (sig, why) = sigs.status_of(f);
                        td.signature {
                            (badge(sig))
                            @if let Some(name) = f.signature.as_ref().and_then(|s| s.signer.as_ref()) { " by " b { (name) } }
                            @if let Some(w) = why { br; span.muted { (w) } }
                        }
                        td { (bytes(f.size)) }
                        td.description { (f.description) }
                        td { (when(f.created_at_ms)) }
                        td {
                            @if to_it.is_empty() { span.muted { "none" } }
                            @for d in &to_it {
                                div.delta {
                                    "from " (d.from_version) " " (badge(d.status.as_str()))
                                    @if let (Some(sz), DeltaStatus::Ready) = (d.size, d.status) {
                                        " " (bytes(sz)) " (" (format!("{:.0}", 100.0 * sz as f64 / d.full_size.max(1) as f64)) " % of " (bytes(d.full_size)) ")"
                                    }
                                    @if let Some(e) = &d.error { " " span.muted { (e) } }
                                }
                            }
                        }
                        @if operator {
                            td.actions {
                                @if f.status != FirmwareStatus::Released {
                                    @match sigs.release_refusal(f) {
                                        Some(why) => {
                                            button.act type="button" disabled title=(why) { "Release" }
                                            " " span.muted.small { "needs a valid signature ([trust] require_signed)" }
                                        }
                                        None => {
                                            button.act type="button" data-post=(format!("/api/ota/firmware/{}/release?deviceType={}", f.version, f.device_type)) { "Release" }
                                        }
                                    }
                                }
                                @if f.status != FirmwareStatus::Deprecated {
                                    " " button.act type="button" data-post=(format!("/api/ota/firmware/{}/status?deviceType={}", f.version, f.device_type)) data-body="{\"status\":\"deprecated\"}" { "Deprecate" }
                                }
                                @if f.status != FirmwareStatus::Released {
                                    " " button.act.danger type="button" data-method="DELETE"
                                        data-post=(format!("/api/ota/firmware/{}?deviceType={}", f.version, f.device_type))
                                        data-confirm=(format!("Delete firmware {} {} and its image?", f.device_type, f.version)) { "Delete" }
                                }
                                form.delta-form.inline data-url=(format!("/api/ota/firmware/{}/deltas?deviceType={}", f.version, f.device_type)) {
                                    input name="fromVersion" placeholder="delta from" maxlength="64" required size="8";
                                    button type="submit" { "Request" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if list.is_empty() { p.muted { "No firmware yet." } }
    };
    let ring = sigs.keyring();
    let site = &sigs.site().public;
    let after = html! {
        section.card #trust {
            h2 { "Trust" }
            p {
                "Site key (signs this appliance's reports; "
                code { "hangar site key" } "): " code.key { (site.base64) } " (id " (site.key_id) ")"
            }
            @if ring.is_empty() {
                p.muted { "No trusted keys: firmware signatures cannot be verified ([trust] keys)." }
            } @else {
                table.keys {
                    thead { tr { th { "Trusted key" } th { "Key id" } th { "From" } } }
                    tbody {
                        @for k in ring.keys() {
                            tr { td { b { (k.name) } } td { code { (k.key_id) } } td { (sigs.origin(&k.name)) } }
                        }
                    }
                }
            }
        }
    };
    let live = html! { (live) (after) };
    Ok(answer(
        &who,
        live_only(&q),
        Nav::Firmware,
        "Firmware",
        "firmware",
        before,
        live,
    ))
}
