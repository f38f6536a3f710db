//! The control-plane commands' HTTP client and output helpers (tables or `--json`).

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// How to reach the appliance, and how to print.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Appliance URL, e.g. http://127.0.0.1:7878.
    #[arg(
        long,
        global = true,
        env = "FERRY_URL",
        default_value = "http://127.0.0.1:7878"
    )]
    pub url: String,
    /// API token (the admin token is in the appliance's DATA_DIR/admin-token).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    pub json: bool,
}

impl Client {
    pub fn new(a: &ClientArgs) -> Result<Client> {
        let base = a.url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url {base:?} must start with http:// or https://");
        }
        Ok(Client {
            base,
            token: a.token.clone(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()?,
            json: a.json,
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow!("no API token: pass --token or set FERRY_TOKEN (the admin token is in the appliance's DATA_DIR/admin-token)")
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    async fn send<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach the appliance at {}", self.base))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .context("reading the appliance's answer")?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let mut out = format!("{msg} (HTTP {})", status.as_u16());
            if let Some(errs) = v["error"]["details"]["errors"].as_array() {
                for e in errs {
                    out.push_str(&format!(
                        "\n  line {}: {}",
                        e["line"],
                        e["message"].as_str().unwrap_or("")
                    ));
                }
            }
            bail!(out);
        }
        if bytes.is_empty() {
            return Ok(serde_json::from_value(Value::Null)?);
        }
        serde_json::from_slice(&bytes).context("the appliance's answer is not the expected JSON")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.req(reqwest::Method::GET, path)?).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.req(reqwest::Method::POST, path)?.json(body))
            .await
    }

    pub async fn post_text<T: DeserializeOwned>(
        &self,
        path: &str,
        ctype: &str,
        body: String,
    ) -> Result<T> {
        self.send(
            self.req(reqwest::Method::POST, path)?
                .header(reqwest::header::CONTENT_TYPE, ctype)
                .body(body),
        )
        .await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.req(reqwest::Method::PUT, path)?.json(body))
            .await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.req(reqwest::Method::PATCH, path)?.json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        let _: Value = self.send(self.req(reqwest::Method::DELETE, path)?).await?;
        Ok(())
    }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

/// Key/value table for one object.
pub fn details(rows: Vec<(&str, String)>) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    t.to_string()
}

pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Unix ms → `YYYY-MM-DD HH:MM:SS` UTC.
pub fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, mo, d) = ferry_model::cron::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

pub fn print_page_footer(total: i64, shown: usize, offset: i64) {
    if total as usize > shown {
        eprintln!(
            "showing {}-{} of {total}; use --offset/--limit for more",
            offset + 1,
            offset + shown as i64
        );
    }
}

/// Paging flags shared by list commands.
#[derive(Args, Debug, Clone)]
pub struct PageArgs {
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[arg(long, default_value_t = 0)]
    pub offset: i64,
}

impl PageArgs {
    pub fn query(&self) -> String {
        format!("limit={}&offset={}", self.limit, self.offset)
    }
}
