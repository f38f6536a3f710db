//! SOAP over HTTPS: envelopes, the session cookie, faults.

use crate::VsphereError;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pub(crate) const VIM: &str = "urn:vim25";
pub(crate) const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
const SOAP_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://vcenter.example.com/sdk` (or just the host's URL; `/sdk` is added).
    pub url: String,
    pub ca_bundle: Option<PathBuf>,
    pub insecure: bool,
    pub timeout: Duration,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ClientOptions {
            url: url.into(),
            ca_bundle: None,
            insecure: false,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The managed objects every call starts from.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceContent {
    pub root_folder: String,
    pub property_collector: String,
    pub view_manager: String,
    pub session_manager: String,
    pub guest_operations_manager: String,
    pub about: String,
}

/// A vSphere session.
pub struct Client {
    pub(crate) http: reqwest::Client,
    url: String,
    opts: ClientOptions,
    cookie: Mutex<Option<String>>,
    /// The login, kept so that an expired session is renewed once, transparently.
    login: Mutex<Option<(String, String)>>,
    pub(crate) content: ServiceContent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// XML-escapes text for an element body.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// `<_this type="T">moref</_this>`
pub(crate) fn this(kind: &str, moref: &str) -> String {
    format!("<_this type=\"{kind}\">{}</_this>", esc(moref))
}

impl Client {
    /// Connects and reads the service content (no login yet).
    pub async fn connect(opts: &ClientOptions) -> Result<Client, VsphereError> {
        let mut url = opts.url.trim_end_matches('/').to_string();
        if !url.ends_with("/sdk") {
            url.push_str("/sdk");
        }
        let mut b = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(Duration::from_secs(10));
        if let Some(p) = &opts.ca_bundle {
            let pem = std::fs::read(p).map_err(|e| VsphereError::Invalid {
                what: format!("cannot read the CA bundle {}: {e}", p.display()),
            })?;
            for c in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| VsphereError::Invalid {
                    what: format!("CA bundle {}: {e}", p.display()),
                })?
            {
                b = b.add_root_certificate(c);
            }
        }
        if opts.insecure {
            tracing::warn!(%url, "TLS certificate verification is OFF for vCenter (--insecure)");
            b = b.danger_accept_invalid_certs(true);
        }
        let http = b.build().map_err(|e| VsphereError::Invalid {
            what: format!("HTTP client: {e}"),
        })?;
        let mut c = Client {
            http,
            url,
            opts: opts.clone(),
            cookie: Mutex::new(None),
            login: Mutex::new(None),
            content: ServiceContent::default(),
        };
        let body = c
            .call(
                "RetrieveServiceContent",
                &this("ServiceInstance", "ServiceInstance"),
            )
            .await?;
        let doc = parse("RetrieveServiceContent", &body)?;
        let rv = returnval(&doc, "RetrieveServiceContent")?;
        let get = |name: &str| {
            child(rv, name)
                .and_then(|n| n.text())
                .unwrap_or_default()
                .to_string()
        };
        c.content = ServiceContent {
            root_folder: get("rootFolder"),
            property_collector: get("propertyCollector"),
            view_manager: get("viewManager"),
            session_manager: get("sessionManager"),
            guest_operations_manager: get("guestOperationsManager"),
            about: child(rv, "about")
                .and_then(|a| child(a, "fullName"))
                .and_then(|n| n.text())
                .unwrap_or_default()
                .to_string(),
        };
        Ok(c)
    }

    /// "VMware vCenter Server 8.0.2 build-…"
    pub fn about(&self) -> &str {
        &self.content.about
    }

    /// The server's base URL, without `/sdk`: where `/folder/…` (datastore files) lives.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches("/sdk")
    }

    /// How this client was set up (the CA bundle and `insecure` matter to anything else
    /// that talks to the same server, like nbdkit reading a datastore file).
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The session cookie (`vmware_soap_session=…`): a secret while the session lives.
    pub fn session_cookie(&self) -> Option<String> {
        self.cookie.lock().expect("cookie").clone()
    }

    pub async fn login(&self, user: &str, password: &str) -> Result<(), VsphereError> {
        self.login_once(user, password).await?;
        *self.login.lock().expect("login") = Some((user.to_string(), password.to_string()));
        Ok(())
    }

    async fn login_once(&self, user: &str, password: &str) -> Result<(), VsphereError> {
        let body = format!(
            "{}<userName>{}</userName><password>{}</password>",
            this("SessionManager", &self.content.session_manager),
            esc(user),
            esc(password)
        );
        match self.call_once("Login", &body).await {
            Err(VsphereError::Fault { call, fault, msg }) if fault == "InvalidLogin" => {
                Err(VsphereError::InvalidLogin {
                    call,
                    user: user.into(),
                    msg,
                })
            }
            other => other.map(drop),
        }
    }

    pub async fn logout(&self) -> Result<(), VsphereError> {
        self.call(
            "Logout",
            &this("SessionManager", &self.content.session_manager),
        )
        .await
        .map(drop)?;
        *self.cookie.lock().expect("cookie") = None;
        *self.login.lock().expect("login") = None;
        Ok(())
    }

    /// One SOAP call: `<method xmlns="urn:vim25">inner</method>`; the response body. A
    /// session that expired (idle timeout, a vCenter restart, an admin ending it) is
    /// renewed with the same login and the call made once more.
    pub(crate) async fn call(&self, method: &str, inner: &str) -> Result<String, VsphereError> {
        match self.call_once(method, inner).await {
            Err(VsphereError::NotAuthenticated { .. })
                if method != "Login" && method != "Logout" =>
            {
                let login = self.login.lock().expect("login").clone();
                let Some((user, password)) = login else {
                    return self.call_once(method, inner).await;
                };
                tracing::info!(method, "the vCenter session expired: logging in again");
                self.login_once(&user, &password).await?;
                self.call_once(method, inner).await
            }
            r => r,
        }
    }

    async fn call_once(&self, method: &str, inner: &str) -> Result<String, VsphereError> {
        let envelope = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope xmlns:soapenv=\"{SOAP_ENV}\" xmlns:xsi=\"{XSI}\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\"><soapenv:Body><{method} xmlns=\"{VIM}\">{inner}</{method}></soapenv:Body></soapenv:Envelope>"
        );
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "urn:vim25/6.5")
            .body(envelope);
        if let Some(c) = self.cookie.lock().expect("cookie").clone() {
            req = req.header("Cookie", c);
        }
        tracing::debug!(method, "vim25 call");
        let r = req.send().await.map_err(|e| {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            if why.to_lowercase().contains("certificate") {
                VsphereError::Tls {
                    call: method.into(),
                    why,
                }
            } else {
                VsphereError::Unreachable {
                    call: method.into(),
                    url: self.url.clone(),
                    why,
                }
            }
        })?;
        for v in r.headers().get_all(reqwest::header::SET_COOKIE) {
            if let Ok(s) = v.to_str() {
                if let Some(c) = s
                    .split(';')
                    .next()
                    .filter(|c| c.starts_with("vmware_soap_session"))
                {
                    *self.cookie.lock().expect("cookie") = Some(c.to_string());
                }
            }
        }
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if text.contains("Fault>") {
            return Err(fault(method, &text));
        }
        if status != 200 {
            return Err(VsphereError::Http {
                call: method.into(),
                status,
                body: text.chars().take(300).collect(),
            });
        }
        Ok(text)
    }
}

/// The typed error of a SOAP fault.
fn fault(method: &str, text: &str) -> VsphereError {
    let Ok(doc) = roxmltree::Document::parse(text) else {
        return VsphereError::BadAnswer {
            call: method.into(),
            why: "a fault that is not XML".into(),
        };
    };
    let msg = doc
        .descendants()
        .find(|n| n.has_tag_name("faultstring"))
        .and_then(|n| n.text())
        .unwrap_or("no message")
        .to_string();
    // The fault's type: the element under <detail>, or its xsi:type.
    let kind = doc
        .descendants()
        .find(|n| n.has_tag_name("detail"))
        .and_then(|d| d.children().find(|c| c.is_element()))
        .map(|n| {
            n.attribute((XSI, "type"))
                .map(str::to_string)
                .unwrap_or_else(|| n.tag_name().name().trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    match kind.as_str() {
        "NotAuthenticated" => VsphereError::NotAuthenticated {
            call: method.into(),
            msg,
        },
        "NoPermission" => VsphereError::NoPermission {
            call: method.into(),
            msg,
        },
        _ => VsphereError::Fault {
            call: method.into(),
            fault: kind,
            msg,
        },
    }
}

pub(crate) fn parse<'a>(
    call: &str,
    text: &'a str,
) -> Result<roxmltree::Document<'a>, VsphereError> {
    roxmltree::Document::parse(text).map_err(|e| VsphereError::BadAnswer {
        call: call.into(),
        why: e.to_string(),
    })
}

pub(crate) fn returnval<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
    call: &str,
) -> Result<roxmltree::Node<'a, 'i>, VsphereError> {
    doc.descendants()
        .find(|n| n.has_tag_name((VIM, "returnval")))
        .ok_or_else(|| VsphereError::BadAnswer {
            call: call.into(),
            why: "no returnval".into(),
        })
}

pub(crate) fn child<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_typed_whatever_the_prefix() {
        let vcsim = r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><Fault xmlns="urn:vim25" XMLSchema-instance:type="InvalidLogin"></Fault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        match fault("Login", vcsim) {
            VsphereError::Fault { fault, msg, .. } => {
                assert_eq!(fault, "InvalidLogin");
                assert_eq!(msg, "Login failure");
            }
            e => panic!("{e:?}"),
        }
        let vcenter = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><soapenv:Fault><faultstring>The session is not authenticated.</faultstring><detail><NotAuthenticatedFault xmlns="urn:vim25"/></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        assert!(matches!(
            fault("RetrievePropertiesEx", vcenter),
            VsphereError::NotAuthenticated { .. }
        ));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
    }
}
