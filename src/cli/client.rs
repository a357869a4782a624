//! Client of the admin API for the CLI verbs. It finds the appliance the way SPEC section 1 says:
//! `--url`/`--token`/`--ca` (or `HANGAR_URL`/`HANGAR_TOKEN`/`HANGAR_CA`), else the config file's
//! data dir (`ports.json`, `admin.token`, `certs/ca.pem`), so nobody types a token on the box.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Config, ConfigError, Listen};

/// Why a CLI verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The appliance could not be located or its credentials read.
    #[error("{0}")]
    Discover(String),
    /// Transport failure.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The API answered with an error envelope.
    #[error("{status}: {message} ({code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Envelope `error` code.
        code: String,
        /// Envelope `message`.
        message: String,
    },
    /// A key, signature, bundle or report did not check out.
    #[error("{0}")]
    Trust(String),
    /// What was followed ended other than well (a campaign with failures, or cancelled): the
    /// process exits with `code`.
    #[error("{message}")]
    Outcome {
        /// The exit status.
        code: u8,
        /// What happened.
        message: String,
    },
    /// Local file problem.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// An API message as the command line says it: the request fields it names become the flags
/// that set them (`pass allowDowngrade` → `pass --allow-downgrade`).
pub fn in_flags(message: &str) -> String {
    const FLAGS: [(&str, &str); 5] = [
        ("pass allowDowngrade", "pass --allow-downgrade"),
        ("with allowOlder=true", "with --allow-older"),
        ("with allowOlder", "with --allow-older"),
        ("pass force", "pass --force"),
        (
            "(a campaign: force)",
            "(a campaign: \"force\": true in its body)",
        ),
    ];
    let mut m = message.to_string();
    for (field, flag) in FLAGS {
        m = m.replace(field, flag);
    }
    m
}

/// How to reach the appliance, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// Config file (as for `serve`).
    pub config: Option<PathBuf>,
    /// Base URL, e.g. `https://127.0.0.1:8443`.
    pub url: Option<String>,
    /// Admin token.
    pub token: Option<String>,
    /// CA certificate to trust.
    pub ca: Option<PathBuf>,
    /// MQTT URL (`mqtt://host:port` or `mqtts://host:port`), for `sim`.
    pub mqtt: Option<String>,
}

/// A connected admin client.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    ca_pem: Option<Vec<u8>>,
    mqtt: Option<String>,
    mqtts: Option<String>,
}

fn loopback_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

fn read_trimmed(path: &Path, what: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            CliError::Discover(format!(
                "cannot read the {what} {}: {e} (is `hangar serve` running with this config, and may you read its data dir? else pass --url/--token)",
                path.display()
            ))
        })
}

impl Client {
    /// Resolves URL, token and CA from the flags and the config, and builds the HTTPS client.
    pub fn connect(ep: &Endpoint) -> Result<Client, CliError> {
        let needs_config = ep.url.is_none() || ep.token.is_none();
        let loaded = match Config::load(ep.config.as_deref()) {
            Ok(l) => Some(l),
            Err(e) if needs_config => return Err(e.into()),
            Err(_) => None,
        };
        let data_dir = loaded.as_ref().map(|l| l.config.client_data_dir());
        let url = match &ep.url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let l = loaded.as_ref().expect("loaded when needed");
                let dir = data_dir.as_ref().expect("loaded when needed");
                let ports_text = read_trimmed(&dir.join("ports.json"), "ports file")?;
                let ports: Value = serde_json::from_str(&ports_text)
                    .map_err(|e| CliError::Discover(format!("ports.json is not JSON: {e}")))?;
                let port = ports["https"]
                    .as_u64()
                    .ok_or_else(|| CliError::Discover("ports.json has no https port".into()))?;
                let listen = l.config.http.listen.addr().expect("validated: on");
                let ip = loopback_for(listen.ip());
                format!("https://{}", crate::net::url_host_port(ip, port as u16))
            }
        };
        let token = match &ep.token {
            Some(t) => t.clone(),
            None => {
                let l = loaded.as_ref().expect("loaded when needed");
                if l.config.auth.admin_token.is_empty() {
                    let dir = data_dir.as_ref().expect("loaded when needed");
                    read_trimmed(&dir.join(crate::server::auth::TOKEN_FILE), "admin token")?
                } else {
                    l.config.auth.admin_token.clone()
                }
            }
        };
        let ca = ep.ca.clone().or_else(|| {
            let l = loaded.as_ref()?;
            if !l.config.tls.cert.is_empty() {
                return None;
            }
            let p = data_dir.as_ref()?.join("certs").join("ca.pem");
            p.exists().then_some(p)
        });
        let from_ports =
            |key: &str, scheme: &str, listen: fn(&Config) -> Listen| -> Option<String> {
                let l = loaded.as_ref()?;
                let text = std::fs::read_to_string(data_dir.as_ref()?.join("ports.json")).ok()?;
                let ports: Value = serde_json::from_str(&text).ok()?;
                let port = ports[key].as_u64()?;
                let listen = listen(&l.config).addr()?;
                let ip = loopback_for(listen.ip());
                Some(format!(
                    "{scheme}://{}",
                    crate::net::url_host_port(ip, port as u16)
                ))
            };
        let mqtt = ep
            .mqtt
            .clone()
            .or_else(|| from_ports("mqtt", "mqtt", |c| c.mqtt.listen));
        let mqtts = ep
            .mqtt
            .clone()
            .filter(|u| u.starts_with("mqtts://"))
            .or_else(|| from_ports("mqtts", "mqtts", |c| c.mqtt.tls_listen));
        // the appliance's audit log says `via: cli` for requests that name this agent
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(concat!("hangar-cli/", env!("CARGO_PKG_VERSION")));
        let mut ca_pem = None;
        if let Some(ca) = &ca {
            let pem = std::fs::read(ca).map_err(|source| CliError::Io {
                context: format!("reading CA {}", ca.display()),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem)?;
            builder = builder.add_root_certificate(cert);
            ca_pem = Some(pem);
        }
        Ok(Client {
            base: url,
            token,
            http: builder.build()?,
            ca_pem,
            mqtt,
            mqtts,
        })
    }

    /// The admin token in use.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The HTTPS client (trusting the appliance's CA).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The PEM of the CA the client trusts, when one was found or given.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca_pem.as_deref()
    }

    /// The broker's URL: `--mqtt`, else the `mqtt` (or with `tls` the `mqtts`) port of
    /// ports.json.
    pub fn mqtt_url(&self, tls: bool) -> Result<&str, CliError> {
        let u = if tls { &self.mqtts } else { &self.mqtt };
        u.as_deref().ok_or_else(|| {
            CliError::Discover(
                "cannot find the MQTT port (no ports.json with that port); pass --mqtt mqtt://host:port or mqtts://host:port".into(),
            )
        })
    }

    /// The base URL in use.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn envelope(resp: reqwest::Response) -> Result<Value, CliError> {
        let status = resp.status();
        let body: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => {
                return Err(CliError::Api {
                    status: status.as_u16(),
                    code: "BAD_RESPONSE".into(),
                    message: format!("the answer is not JSON: {e}"),
                });
            }
        };
        if status.is_success() && body["status"] == Value::Bool(true) {
            Ok(body["data"].clone())
        } else {
            Err(CliError::Api {
                status: status.as_u16(),
                code: body["error"].as_str().unwrap_or("UNKNOWN").to_string(),
                message: in_flags(body["message"].as_str().unwrap_or("")),
            })
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<reqwest::Response, CliError> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query);
        if let Some(b) = body {
            r = r.json(b);
        }
        Ok(r.send().await?)
    }

    /// GET an API path with query pairs; returns `data`.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        Self::envelope(self.send(reqwest::Method::GET, path, query, None).await?).await
    }

    /// GET one page of a list: `data` and the total across pages (`X-Total-Count`).
    pub async fn get_page(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(Vec<Value>, Option<usize>), CliError> {
        let resp = self.send(reqwest::Method::GET, path, query, None).await?;
        let total = resp
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let data = Self::envelope(resp).await?;
        Ok((data.as_array().cloned().unwrap_or_default(), total))
    }

    /// Up to `limit` items of a list (all with `None`), fetched a page of 1,000 at a time, and
    /// the total across pages.
    pub async fn get_list(
        &self,
        path: &str,
        query: &[(&str, String)],
        limit: Option<usize>,
    ) -> Result<(Vec<Value>, usize), CliError> {
        const PAGE: usize = 1000;
        let mut out = Vec::new();
        loop {
            let want = limit.map_or(PAGE, |l| (l - out.len()).min(PAGE));
            let mut q = query.to_vec();
            q.push(("limit", want.to_string()));
            q.push(("offset", out.len().to_string()));
            let (page, total) = self.get_page(path, &q).await?;
            let got = page.len();
            out.extend(page);
            let total = total.unwrap_or(out.len());
            if got < want || out.len() >= total || limit.is_some_and(|l| out.len() >= l) {
                return Ok((out, total));
            }
        }
    }

    /// POST JSON to an API path; returns `data`.
    pub async fn post(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &Value,
    ) -> Result<Value, CliError> {
        Self::envelope(
            self.send(reqwest::Method::POST, path, query, Some(body))
                .await?,
        )
        .await
    }

    /// PATCH JSON to an API path; returns `data`.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        Self::envelope(
            self.send(reqwest::Method::PATCH, path, &[], Some(body))
                .await?,
        )
        .await
    }

    /// DELETE an API path; returns `data`.
    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        Self::envelope(
            self.send(reqwest::Method::DELETE, path, query, None)
                .await?,
        )
        .await
    }

    /// GETs `path` into the file `out` (temp file, fsync, rename); returns the bytes written.
    pub async fn download_to(&self, path: &str, out: &Path) -> Result<u64, CliError> {
        use tokio::io::AsyncWriteExt;
        let mut resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(Self::envelope(resp)
                .await
                .err()
                .unwrap_or(CliError::Discover("unexpected answer".into())));
        }
        let io = |context: String| move |source| CliError::Io { context, source };
        let tmp = out.with_extension("partial");
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(io(format!("creating {}", tmp.display())))?;
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            f.write_all(&chunk)
                .await
                .map_err(io(format!("writing {}", tmp.display())))?;
            n += chunk.len() as u64;
        }
        f.sync_all()
            .await
            .map_err(io(format!("fsync {}", tmp.display())))?;
        tokio::fs::rename(&tmp, out)
            .await
            .map_err(io(format!("renaming to {}", out.display())))?;
        Ok(n)
    }

    /// Streams `file` to the upload endpoint with the given text fields; `progress` is told how
    /// many bytes have gone out.
    pub async fn upload(
        &self,
        file: &Path,
        fields: Vec<(&'static str, String)>,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, CliError> {
        use futures_util::StreamExt;
        let (f, len) = open_sized(file).await?;
        let mut sent = 0u64;
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).map(move |chunk| {
            if let Ok(c) = &chunk {
                sent += c.len() as u64;
                progress(sent);
            }
            chunk
        });
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firmware.bin".into());
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
                .file_name(name)
                .mime_str("application/octet-stream")?;
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k, v);
        }
        form = form.part("file", part);
        let resp = self
            .http
            .post(format!("{}/api/ota/firmware/upload", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await?;
        Self::envelope(resp).await
    }

    /// POSTs a file as the raw request body (streamed, `application/octet-stream`).
    pub async fn post_file(
        &self,
        path: &str,
        query: &[(&str, String)],
        file: &Path,
    ) -> Result<Value, CliError> {
        let (f, len) = open_sized(file).await?;
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024);
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .query(query)
            .header("content-type", "application/octet-stream")
            .header("content-length", len)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await?;
        Self::envelope(resp).await
    }
}

/// A file opened for streaming, and its length.
async fn open_sized(file: &Path) -> Result<(tokio::fs::File, u64), CliError> {
    let io = |what: &str| {
        let context = format!("{what} {}", file.display());
        move |source| CliError::Io { context, source }
    };
    let f = tokio::fs::File::open(file).await.map_err(io("opening"))?;
    let len = f.metadata().await.map_err(io("reading"))?.len();
    Ok((f, len))
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_fields_become_flags() {
        assert_eq!(
            super::in_flags(
                "device GW1 runs 1.0.3, newer than 1.0.2: pass allowDowngrade (a campaign: force) to go back"
            ),
            "device GW1 runs 1.0.3, newer than 1.0.2: pass --allow-downgrade (a campaign: \"force\": true in its body) to go back"
        );
        assert_eq!(
            super::in_flags(
                "already has an active task (1.0.1 to 1.0.2, pending): wait, cancel it, or pass force"
            ),
            "already has an active task (1.0.1 to 1.0.2, pending): wait, cancel it, or pass --force"
        );
        assert_eq!(
            super::in_flags("an older or replayed bundle (import it anyway with allowOlder=true)"),
            "an older or replayed bundle (import it anyway with --allow-older)"
        );
    }
}
