//! A small Azure Blob REST client: exactly the calls the transfer engine needs, with the
//! control it needs (Content-MD5 on Put Blob and Put Block List, ranged GETs, per-request
//! timeouts sized to the payload, bounded retries). See the commit that introduced it for why
//! this is not `object_store`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::backend::{Backend, Hashes, ObjectStore};
pub use super::backend::{Body, PutOutcome};
use super::retry::{self, Outage, Retries};
use super::{AzureBlobConfig, AzureCredential, ObjectMeta, shared_key};
use crate::error::{Error, Result};

pub const API_VERSION: &str = "2021-12-02";
/// Characters left as they are in a URL path segment or query value; everything else is escaped.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');
/// Reads of one body, the first included: a connection broken mid-body is read again from the
/// last byte written (each read rides through an outage within the retry budget).
const BODY_READS: u32 = 5;

/// Knobs shared by every request of a run.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// How long storage may fail a request with transient faults before it gives up, and the
    /// outage clock of the clients made with this tuning, which progress reports read (see
    /// [`retry`]).
    pub outage: Outage,
    /// Time allowed for a request with no payload.
    pub base_timeout: Duration,
    /// The slowest throughput a payload may move at before its request times out: a request
    /// carrying `n` bytes gets `base_timeout + n / min_throughput`.
    pub min_throughput: u64,
    /// Idle connections kept per host: as many as requests in flight.
    pub pool_size: usize,
}

impl Tuning {
    /// A transfer's tuning: `concurrency` requests in flight, transient faults retried for
    /// `retry_budget`.
    pub fn transfer(concurrency: usize, retry_budget: Duration) -> Tuning {
        Tuning {
            pool_size: concurrency,
            outage: Outage::new(retry_budget),
            ..Tuning::default()
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            outage: Outage::default(),
            base_timeout: Duration::from_secs(30),
            min_throughput: 256 * 1024,
            pool_size: 16,
        }
    }
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    async fn to_reqwest(&self) -> std::io::Result<reqwest::Body> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        Ok(match self {
            Body::Empty => reqwest::Body::from(Bytes::new()),
            Body::Bytes(b) => reqwest::Body::from(b.clone()),
            Body::File { path, offset, len } => {
                let mut file = tokio::fs::File::open(path).await?;
                file.seek(std::io::SeekFrom::Start(*offset)).await?;
                let stream =
                    tokio_util::io::ReaderStream::with_capacity(file.take(*len), 256 * 1024);
                reqwest::Body::wrap_stream(stream)
            }
        })
    }
}

/// A failed request, before it is turned into a user-facing [`Error`] with context.
#[derive(Debug)]
enum Failure {
    Status {
        status: StatusCode,
        code: String,
        message: String,
        /// The service's `Retry-After`, on 429 and 503.
        retry_after: Option<Duration>,
    },
    Transport(String, bool),
    Body(std::io::Error),
    /// The blob name has a `.` or `..` segment; it was not sent.
    DotSegment,
    /// A transient fault that lasted past the retry budget.
    OutOfBudget {
        last: Box<Failure>,
        budget: Duration,
    },
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => {
                matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
            }
            Failure::Transport(_, retryable) => *retryable,
            Failure::Body(_) | Failure::DotSegment | Failure::OutOfBudget { .. } => false,
        }
    }

    /// A transient fault in a few words, for the progress reports: `503 ServerBusy`, or the
    /// transport's own words (`Connection refused (os error 111)`).
    fn cause(&self) -> String {
        match self {
            Failure::Status { status, code, .. } => format!("{} {code}", status.as_u16()),
            Failure::Transport(msg, _) => msg.clone(),
            Failure::Body(e) => e.to_string(),
            Failure::DotSegment => "a `.` or `..` segment".into(),
            Failure::OutOfBudget { last, .. } => last.cause(),
        }
    }
}

#[derive(Clone)]
pub struct BlobClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    cfg: AzureBlobConfig,
    /// `endpoint/container`, without a trailing slash.
    container_url: String,
    /// The decoded account key, for Shared Key.
    key: Option<Vec<u8>>,
    /// The SAS token's query, appended to every URL.
    sas: Option<String>,
    token: Option<Mutex<Option<(String, Instant)>>>,
    tuning: Tuning,
}

impl BlobClient {
    /// What the client was made from.
    pub fn config(&self) -> &AzureBlobConfig {
        &self.inner.cfg
    }

    pub fn new(cfg: AzureBlobConfig, tuning: Tuning) -> Result<Self> {
        let (key, sas, token) = match &cfg.credential {
            AzureCredential::AccountKey(k) => {
                let key = B64.decode(k.expose().trim()).map_err(|_| {
                    Error::Config(format!(
                        "the accountKey in {} is not valid base64: copy the key as the portal shows it (Storage account > Access keys)",
                        cfg.credential_source
                    ))
                })?;
                (Some(key), None, None)
            }
            AzureCredential::SasToken(t) => (
                None,
                Some(t.expose().trim().trim_start_matches('?').to_string()),
                None,
            ),
            AzureCredential::WorkloadIdentity { .. } => (None, None, Some(Mutex::new(None))),
            AzureCredential::Anonymous => (None, None, None),
        };
        let container_url = format!(
            "{}/{}",
            cfg.endpoint.as_str().trim_end_matches('/'),
            cfg.container
        );
        Ok(BlobClient {
            inner: Arc::new(Inner {
                http: http_client(tuning.pool_size)?,
                cfg,
                container_url,
                key,
                sas,
                token,
                tuning,
            }),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "container '{}' of account '{}' ({})",
            self.inner.cfg.container, self.inner.cfg.account, self.inner.cfg.endpoint
        )
    }

    pub fn tuning(&self) -> &Tuning {
        &self.inner.tuning
    }

    /// Every blob whose name starts with `prefix`, following continuation markers.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self.list_page(prefix, marker.as_deref(), 5000).await?;
            out.extend(page.blobs);
            match page.next_marker {
                // The service always moves the marker forward; a repeat would loop forever.
                Some(next) if Some(&next) == marker.as_ref() => {
                    return Err(Error::Service(format!(
                        "the blob listing of {} repeated its continuation marker",
                        self.describe()
                    )));
                }
                Some(next) => marker = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Lists at most one blob: proves the endpoint, the credentials and the container.
    pub async fn check(&self) -> Result<()> {
        self.list_page("", None, 1).await.map(|_| ())
    }

    /// Creates the container; an existing one is fine.
    pub async fn create_container(&self) -> Result<()> {
        match self
            .send(
                Method::PUT,
                None,
                vec![q("restype", "container")],
                HeaderMap::new(),
                &Body::Empty,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(Failure::Status {
                status: StatusCode::CONFLICT,
                code,
                ..
            }) if code == "ContainerAlreadyExists" => Ok(()),
            Err(f) => Err(self.error(f, None)),
        }
    }

    async fn list_page(&self, prefix: &str, marker: Option<&str>, max: u32) -> Result<ListPage> {
        let mut query = vec![
            q("restype", "container"),
            q("comp", "list"),
            q("maxresults", &max.to_string()),
            // Directories of hierarchical-namespace accounts (and blobfuse folder markers) are
            // zero-length blobs with metadata hdi_isfolder=true: folders, not data.
            q("include", "metadata"),
        ];
        if !prefix.is_empty() {
            query.push(q("prefix", prefix));
        }
        if let Some(m) = marker {
            query.push(q("marker", m));
        }
        let resp = self
            .send(Method::GET, None, query, HeaderMap::new(), &Body::Empty)
            .await
            .map_err(|f| self.error(f, None))?;
        let text = resp
            .text()
            .await
            .map_err(|e| self.error(transport(e), None))?;
        parse_list(&text).map_err(|e| {
            Error::Service(format!(
                "cannot read the blob listing of {}: {e}",
                self.describe()
            ))
        })
    }

    /// Put Blob: one request for a whole (small) blob, with its Content-MD5.
    pub async fn put_blob(
        &self,
        name: &str,
        body: Body,
        md5: [u8; 16],
        overwrite: bool,
    ) -> Result<PutOutcome> {
        let mut headers = HeaderMap::new();
        headers.insert("x-ms-blob-type", HeaderValue::from_static("BlockBlob"));
        headers.insert("content-md5", header(&B64.encode(md5)));
        self.create(name, Vec::new(), headers, &body, md5, overwrite)
            .await
    }

    /// Put Block: one block of a large blob, staged until [`Self::put_block_list`] commits it.
    pub async fn put_block(
        &self,
        name: &str,
        ids: &BlockIds,
        index: usize,
        body: Body,
    ) -> Result<()> {
        let query = vec![q("comp", "block"), q("blockid", &ids.id(index))];
        self.send(Method::PUT, Some(name), query, HeaderMap::new(), &body)
            .await
            .map_err(|f| self.error(f, Some(name)))?;
        Ok(())
    }

    /// Get Block List: the staged, uncommitted blocks of `name` (ID and size), which an
    /// interrupted upload left; none when there is no such blob, or when the credentials may
    /// not read (an upload-only SAS): the upload then sends every block.
    pub async fn uncommitted_blocks(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let query = vec![q("comp", "blocklist"), q("blocklisttype", "uncommitted")];
        let resp = match self
            .send(
                Method::GET,
                Some(name),
                query,
                HeaderMap::new(),
                &Body::Empty,
            )
            .await
        {
            Ok(resp) => resp,
            Err(Failure::Status {
                status: StatusCode::NOT_FOUND | StatusCode::FORBIDDEN,
                ..
            }) => return Ok(Vec::new()),
            Err(f) => return Err(self.error(f, Some(name))),
        };
        let text = resp
            .text()
            .await
            .map_err(|e| self.error(transport(e), Some(name)))?;
        parse_block_list(&text).map_err(|e| {
            Error::Service(format!(
                "cannot read the block list of blob '{}': {e}",
                crate::paths::display_name(name)
            ))
        })
    }

    /// Put Block List: commits blocks `0..blocks` as the blob, setting its Content-MD5.
    pub async fn put_block_list(
        &self,
        name: &str,
        ids: &BlockIds,
        blocks: usize,
        md5: [u8; 16],
        overwrite: bool,
    ) -> Result<PutOutcome> {
        let mut xml = String::with_capacity(64 + blocks * 40);
        xml.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
        for i in 0..blocks {
            xml.push_str("<Latest>");
            xml.push_str(&ids.id(i));
            xml.push_str("</Latest>");
        }
        xml.push_str("</BlockList>");
        let mut headers = HeaderMap::new();
        headers.insert("x-ms-blob-content-md5", header(&B64.encode(md5)));
        self.create(
            name,
            vec![q("comp", "blocklist")],
            headers,
            &Body::Bytes(Bytes::from(xml)),
            md5,
            overwrite,
        )
        .await
    }

    async fn create(
        &self,
        name: &str,
        query: Vec<(String, String)>,
        mut headers: HeaderMap,
        body: &Body,
        md5: [u8; 16],
        overwrite: bool,
    ) -> Result<PutOutcome> {
        if !overwrite {
            // The service, not our listing, has the last word: never replace a blob that
            // appeared after we listed.
            headers.insert("if-none-match", HeaderValue::from_static("*"));
        }
        let (result, attempts) = self
            .send_counted(Method::PUT, Some(name), query, headers, body, body.len())
            .await;
        let exists = match result {
            Ok(_) => return Ok(PutOutcome::Created),
            Err(Failure::Status {
                status: StatusCode::CONFLICT,
                code,
                ..
            }) if code == "BlobAlreadyExists" => true,
            Err(Failure::Status {
                status: StatusCode::PRECONDITION_FAILED,
                ..
            }) if !overwrite => true,
            Err(f) => return Err(self.error(f, Some(name))),
        };
        // After a retry, the blob that exists may be our own first attempt, committed before
        // its answer was lost: the same bytes mean it was created by us, not skipped.
        if exists && attempts > 1 && self.content_md5(name).await == Some(md5) {
            return Ok(PutOutcome::Created);
        }
        Ok(PutOutcome::AlreadyExists)
    }

    /// Get Blob Properties: the blob's Content-MD5, if it has one and we may read it (an
    /// upload-only SAS may not).
    async fn content_md5(&self, name: &str) -> Option<[u8; 16]> {
        let resp = self
            .send(
                Method::HEAD,
                Some(name),
                Vec::new(),
                HeaderMap::new(),
                &Body::Empty,
            )
            .await
            .ok()?;
        let value = resp.headers().get("content-md5")?;
        B64.decode(value.as_bytes()).ok()?.try_into().ok()
    }

    /// GET a blob, or one range of it; with `if_match`, only the version with that ETag (a
    /// replaced blob is `Integrity`: changed while it was read).
    pub async fn get(
        &self,
        name: &str,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut headers = HeaderMap::new();
        if let Some(etag) = if_match {
            headers.insert("If-Match", header(etag));
        }
        let len = match range {
            Some((start, end)) => {
                headers.insert("x-ms-range", header(&format!("bytes={start}-{}", end - 1)));
                end - start
            }
            None => 0,
        };
        self.send_counted(
            Method::GET,
            Some(name),
            Vec::new(),
            headers,
            &Body::Empty,
            len,
        )
        .await
        .0
        .map_err(|f| self.error(f, Some(name)))
    }

    /// Get Blob Properties (HEAD) of `name`: a read that costs no body and answers for an
    /// empty blob too. A SAS needs read (`r`) for it, list (`l`) is not enough: it proves the
    /// credentials may read the blob.
    pub async fn properties(&self, name: &str) -> Result<()> {
        self.send(
            Method::HEAD,
            Some(name),
            Vec::new(),
            HeaderMap::new(),
            &Body::Empty,
        )
        .await
        .map(|_| ())
        .map_err(|f| self.error(f, Some(name)))
    }

    /// The time a payload of `len` bytes may take.
    pub fn timeout_for(&self, len: u64) -> Duration {
        let t = &self.inner.tuning;
        t.base_timeout + Duration::from_secs_f64(len as f64 / t.min_throughput.max(1) as f64)
    }

    /// Turns a body read error into the error the user sees (the engine reads the range again).
    pub fn body_error(&self, name: &str, err: reqwest::Error) -> Error {
        let failure = transport(err);
        if failure.retryable() {
            self.inner.tuning.outage.failed(&failure.cause());
        }
        self.error(failure, Some(name))
    }

    async fn send(
        &self,
        method: Method,
        blob: Option<&str>,
        query: Vec<(String, String)>,
        headers: HeaderMap,
        body: &Body,
    ) -> Result<reqwest::Response, Failure> {
        let len = body.len();
        self.send_counted(method, blob, query, headers, body, len)
            .await
            .0
    }

    /// Sends, retrying transient faults within the retry budget (`len` sizes the timeout);
    /// also says how many attempts it took.
    async fn send_counted(
        &self,
        method: Method,
        blob: Option<&str>,
        query: Vec<(String, String)>,
        headers: HeaderMap,
        body: &Body,
        len: u64,
    ) -> (Result<reqwest::Response, Failure>, u32) {
        let tuning = &self.inner.tuning;
        let mut retries = Retries::new(&tuning.outage);
        loop {
            match self
                .send_once(&method, blob, &query, headers.clone(), body, len)
                .await
            {
                Ok(resp) => {
                    tuning.outage.answered();
                    return (Ok(resp), retries.attempts());
                }
                Err(f) if f.retryable() => {
                    let retry_after = match &f {
                        Failure::Status { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    match retries.after_failure(&f.cause(), retry_after) {
                        Some(delay) => {
                            tracing::debug!(
                                ?f,
                                attempts = retries.attempts(),
                                ?delay,
                                blob,
                                "retrying request"
                            );
                            tokio::time::sleep(delay).await;
                        }
                        None => {
                            let failing_for = retries.failing_for();
                            tracing::debug!(
                                ?f,
                                ?failing_for,
                                blob,
                                "giving up: the retry budget is spent"
                            );
                            let last = Box::new(f);
                            let budget = tuning.outage.budget();
                            return (
                                Err(Failure::OutOfBudget { last, budget }),
                                retries.attempts(),
                            );
                        }
                    }
                }
                Err(f) => {
                    tuning.outage.answered();
                    return (Err(f), retries.attempts());
                }
            }
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        blob: Option<&str>,
        query: &[(String, String)],
        mut headers: HeaderMap,
        body: &Body,
        len: u64,
    ) -> Result<reqwest::Response, Failure> {
        let inner = &*self.inner;
        let mut url = inner.container_url.clone();
        if let Some(name) = blob {
            // URLs resolve `.` and `..` (escaped or not): such a name would address another
            // blob, or another container, under the same credentials.
            if crate::paths::has_dot_segment(name) {
                return Err(Failure::DotSegment);
            }
            url.push('/');
            url.extend(utf8_percent_encode(name, PATH));
        }
        let mut sep = '?';
        for (k, v) in query {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.extend(utf8_percent_encode(v, UNRESERVED));
            sep = '&';
        }
        if let Some(sas) = &inner.sas {
            url.push(sep);
            url.push_str(sas);
        }
        headers.insert("x-ms-version", HeaderValue::from_static(API_VERSION));
        headers.insert("x-ms-date", header(&httpdate(std::time::SystemTime::now())));
        if *method == Method::PUT {
            headers.insert(
                http::header::CONTENT_LENGTH,
                header(&body.len().to_string()),
            );
        }
        if let Some(key) = &inner.key {
            let path = url::Url::parse(&url)
                .map(|u| u.path().to_string())
                .unwrap_or_default();
            let auth = shared_key::authorization(
                &inner.cfg.account,
                key,
                method.as_str(),
                &path,
                query,
                &headers,
            );
            headers.insert(http::header::AUTHORIZATION, header(&auth));
        } else if inner.token.is_some() {
            let token = self.bearer_token().await?;
            headers.insert(
                http::header::AUTHORIZATION,
                header(&format!("Bearer {token}")),
            );
        }
        let req_body = body.to_reqwest().await.map_err(Failure::Body)?;
        let resp = inner
            .http
            .request(method.clone(), &url)
            .headers(headers)
            .body(req_body)
            .timeout(self.timeout_for(len))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry::retry_after(resp.headers());
        let code = resp
            .headers()
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.text().await.unwrap_or_default();
        let message = between(&text, "<Message>", "</Message>")
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        Err(Failure::Status {
            status,
            code,
            message,
            retry_after,
        })
    }

    /// A storage token for the workload identity, refreshed five minutes before it expires.
    async fn bearer_token(&self) -> Result<String, Failure> {
        let AzureCredential::WorkloadIdentity { client_id } = &self.inner.cfg.credential else {
            unreachable!("a token cache exists only for workload identity")
        };
        let mut cache = self
            .inner
            .token
            .as_ref()
            .expect("workload identity has a token cache")
            .lock()
            .await;
        if let Some((token, expires)) = &*cache
            && Instant::now() + Duration::from_secs(300) < *expires
        {
            return Ok(token.clone());
        }
        let (token, ttl) = workload_identity_token(&self.inner.http, client_id)
            .await
            .map_err(|e| Failure::Status {
                status: StatusCode::UNAUTHORIZED,
                code: "WorkloadIdentityTokenFailed".into(),
                message: e,
                retry_after: None,
            })?;
        *cache = Some((token.clone(), Instant::now() + ttl));
        Ok(token)
    }

    /// One sentence with the fix, naming the datastore's container and, where it helps, the blob.
    fn error(&self, f: Failure, blob: Option<&str>) -> Error {
        if let Failure::OutOfBudget { last, budget } = f {
            let error = self.error(*last, blob);
            return error.with_message(format!(
                "{error}; it kept failing for the retry budget of {} (--retry-budget, or the operator's retryBudget): run again once storage answers, or allow a longer budget",
                crate::duration::format(budget)
            ));
        }
        let cfg = &self.inner.cfg;
        let what = self.describe();
        // Blob names and the service's words reach a terminal: control characters escaped.
        let blob = blob.map(crate::paths::display_name);
        let blob = blob.as_deref();
        let f = match f {
            Failure::Status {
                status,
                code,
                message,
                retry_after,
            } => Failure::Status {
                status,
                code: crate::paths::display_name(&code).into_owned(),
                message: crate::paths::display_name(&message).into_owned(),
                retry_after,
            },
            f => f,
        };
        let on_blob = blob.map(|b| format!(" (blob '{b}')")).unwrap_or_default();
        match f {
            Failure::Status {
                status,
                code,
                message,
                ..
            } => match (status.as_u16(), code.as_str()) {
                (_, "WorkloadIdentityTokenFailed") => Error::Auth(format!(
                    "cannot get a storage token for workload identity client '{}': {message}; check that the pod's service account is federated with that identity and has a Storage Blob Data role on account '{}'",
                    match &cfg.credential {
                        AzureCredential::WorkloadIdentity { client_id } => client_id.as_str(),
                        _ => "",
                    },
                    cfg.account
                )),
                (404, "ContainerNotFound") => Error::NotFound(format!(
                    "{what} does not exist: create it (az storage container create --account-name {} --name {}) or fix containerName",
                    cfg.account, cfg.container
                )),
                // Put Block List after another writer committed the blob, which discarded the
                // blocks we had staged.
                (400, "InvalidBlockList") => Error::Service(format!(
                    "blob '{}' was replaced by another writer while we uploaded it, which discarded our staged blocks; its version stands: run again to replace it, and let one writer at a time upload to this path",
                    blob.unwrap_or("")
                )),
                (412, "ConditionNotMet") => Error::Integrity(format!(
                    "blob '{}' was replaced while it was being downloaded (its version no longer matches the listing), so its old and new contents could have been mixed; nothing was written under its name: run again to get the new version",
                    blob.unwrap_or("")
                )),
                (404, "BlobNotFound") => Error::NotFound(format!(
                    "blob '{}' no longer exists in {what}: it was deleted while we worked; run again",
                    blob.unwrap_or("")
                )),
                (401 | 403, _) if cfg.credential == AzureCredential::Anonymous => {
                    Error::Auth(format!(
                        "{what} refused anonymous access ({code}): add credentials (a secretRef or workloadIdentity) to the datastore"
                    ))
                }
                (
                    401 | 403,
                    // Not AuthorizationFailure: Azurite answers it for a wrong key or SAS
                    // signature, Azure for a request its network rules block.
                    "AuthorizationPermissionMismatch" | "AuthorizationResourceTypeMismatch",
                ) => Error::Auth(format!(
                    "the {} from {} is not allowed to do this on {what}{on_blob} ({code}): grant the missing permission (for a SAS: read, list, create, write)",
                    cfg.credential.kind(),
                    cfg.credential_source
                )),
                (401 | 403, _) => Error::Auth(format!(
                    "{what} rejected the {} from {} ({}): check that it belongs to account '{}' and has not expired or been rotated{}",
                    cfg.credential.kind(),
                    cfg.credential_source,
                    if code.is_empty() {
                        status.as_str()
                    } else {
                        &code
                    },
                    cfg.account,
                    if code == "AuthorizationFailure" {
                        ", and that the account's network rules admit this machine"
                    } else {
                        ""
                    }
                )),
                (400, "InvalidQueryParameterValue" | "InvalidUri" | "OutOfRangeInput") => {
                    Error::Config(format!(
                        "{what} refused the request{on_blob} ({code}: {message}): check containerName and the path"
                    ))
                }
                _ => Error::Service(format!(
                    "{what} answered {status}{}{on_blob}{}{}",
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(" {code}")
                    },
                    if message.is_empty() { "" } else { ": " },
                    message
                )),
            },
            Failure::Transport(msg, _) => Error::Unreachable(format!(
                "cannot reach {what}{on_blob}: {msg}; check the endpoint and that this machine can reach it"
            )),
            Failure::DotSegment => Error::UnsafeName(format!(
                "blob name '{}' has a `.` or `..` segment, which a URL cannot address safely: rename it",
                blob.unwrap_or("")
            )),
            Failure::Body(e) => {
                Error::Local(format!("cannot read the local file to send{on_blob}: {e}"))
            }
            Failure::OutOfBudget { .. } => unreachable!("unwrapped above"),
        }
    }
}

/// The HTTP client. Its settings are fixed, so it fails only where the machine (or image) has
/// no CA certificates for TLS.
fn http_client(pool_size: usize) -> Result<reqwest::Client> {
    // One TLS provider for the whole process (kube uses ring too); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_max_idle_per_host(pool_size)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = s.to_string();
                source = s.source();
            }
            Error::Config(format!(
                "cannot set up HTTPS ({why}): this machine or image needs the CA certificates (Debian: the ca-certificates package, /etc/ssl/certs)"
            ))
        })
}

fn transport(e: reqwest::Error) -> Failure {
    // The URL may carry a SAS token: never let it into a message.
    let e = e.without_url();
    // The source chain holds the useful part ("Connection refused"); keep it short.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = s.to_string();
        source = s.source();
    }
    let retryable = e.is_timeout() || e.is_connect() || e.is_request() || e.is_body();
    let msg = if e.is_timeout() {
        format!("the request timed out ({msg})")
    } else {
        msg
    };
    Failure::Transport(msg, retryable)
}

impl Backend for BlobClient {
    fn read_only(&self) -> bool {
        self.config().read_only
    }
    fn hashes(&self) -> Hashes {
        Hashes { md5: true }
    }
    async fn check(&self) -> Result<()> {
        BlobClient::check(self).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        BlobClient::list(self, prefix).await
    }
    async fn prove_read(&self, listed: &[ObjectMeta]) -> Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let names: Vec<String> = self
            .config()
            .credential
            .read_proofs(listed)
            .into_iter()
            .map(|object| object.name.clone())
            .collect();
        // Owned names: futures borrowing the stream's items trip the compiler's higher-ranked
        // `Send` check the trait's `+ Send` asks for.
        futures::stream::iter(names)
            .map(|name| async move { self.properties(&name).await })
            .buffer_unordered(self.tuning().pool_size.max(1))
            .try_collect()
            .await
    }
}

impl ObjectStore for BlobClient {
    type Body = reqwest::Response;

    async fn read(&self, object: &ObjectMeta, range: Option<(u64, u64)>) -> Result<Self::Body> {
        self.get(&object.name, range, object.etag.as_deref()).await
    }
    async fn chunk(&self, body: &mut Self::Body, name: &str) -> Result<Option<Bytes>> {
        body.chunk().await.map_err(|e| self.body_error(name, e))
    }
    fn attempts(&self) -> u32 {
        BODY_READS
    }
    async fn put(
        &self,
        name: &str,
        body: Body,
        md5: [u8; 16],
        overwrite: bool,
    ) -> Result<PutOutcome> {
        self.put_blob(name, body, md5, overwrite).await
    }
    async fn staged_blocks(&self, name: &str) -> Result<Vec<(String, u64)>> {
        self.uncommitted_blocks(name).await
    }
    async fn put_block(&self, name: &str, ids: &BlockIds, index: usize, body: Body) -> Result<()> {
        BlobClient::put_block(self, name, ids, index, body).await
    }
    async fn commit_blocks(
        &self,
        name: &str,
        ids: &BlockIds,
        blocks: usize,
        md5: [u8; 16],
        overwrite: bool,
    ) -> Result<PutOutcome> {
        self.put_block_list(name, ids, blocks, md5, overwrite).await
    }
}

fn q(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).expect("generated header values are visible ASCII")
}

/// The block IDs of one upload. They all have the same length (the service requires it) and
/// carry a random nonce, so two uploads of one name never stage over each other's blocks.
#[derive(Clone, Debug)]
pub struct BlockIds {
    nonce: u64,
}

impl BlockIds {
    pub fn new() -> Self {
        BlockIds {
            nonce: rand::random(),
        }
    }

    /// The IDs for one version of a source (e.g. its name, size, modification time and block
    /// size): the same in every run, so a re-run recognises the blocks an interrupted run
    /// staged.
    pub fn derived_from(source: &str) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(source.as_bytes());
        BlockIds {
            nonce: u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")),
        }
    }

    pub fn id(&self, index: usize) -> String {
        B64.encode(format!("{:016x}-{index:08}", self.nonce))
    }
}

impl Default for BlockIds {
    fn default() -> Self {
        Self::new()
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

fn httpdate(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

struct ListPage {
    blobs: Vec<ObjectMeta>,
    next_marker: Option<String>,
}

#[derive(Deserialize)]
struct EnumerationResults {
    #[serde(rename = "Blobs", default)]
    blobs: BlobsXml,
    #[serde(rename = "NextMarker", default)]
    next_marker: Option<String>,
}

#[derive(Deserialize, Default)]
struct BlobsXml {
    #[serde(rename = "Blob", default)]
    blob: Vec<BlobXml>,
}

#[derive(Deserialize)]
struct BlobXml {
    #[serde(rename = "Name")]
    name: NameXml,
    #[serde(rename = "Properties")]
    properties: PropertiesXml,
    #[serde(rename = "Metadata", default)]
    metadata: MetadataXml,
}

#[derive(Deserialize, Default)]
struct MetadataXml {
    #[serde(rename = "hdi_isfolder", default)]
    hdi_isfolder: Option<String>,
}

#[derive(Deserialize)]
struct NameXml {
    #[serde(rename = "@Encoded", default)]
    encoded: Option<bool>,
    #[serde(rename = "$text", default)]
    value: String,
}

#[derive(Deserialize)]
struct PropertiesXml {
    #[serde(rename = "Content-Length")]
    content_length: u64,
    #[serde(rename = "Content-MD5", default)]
    content_md5: Option<String>,
    #[serde(rename = "Etag", default)]
    etag: Option<String>,
}

#[derive(Deserialize)]
struct BlockListXml {
    #[serde(rename = "UncommittedBlocks", default)]
    uncommitted: BlocksXml,
}

#[derive(Deserialize, Default)]
struct BlocksXml {
    #[serde(rename = "Block", default)]
    blocks: Vec<BlockXml>,
}

#[derive(Deserialize)]
struct BlockXml {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Size")]
    size: u64,
}

fn parse_block_list(xml: &str) -> std::result::Result<Vec<(String, u64)>, String> {
    let list: BlockListXml = quick_xml::de::from_str(xml).map_err(|e| e.to_string())?;
    Ok(list
        .uncommitted
        .blocks
        .into_iter()
        .map(|b| (b.name, b.size))
        .collect())
}

fn parse_list(xml: &str) -> std::result::Result<ListPage, String> {
    let parsed: EnumerationResults = quick_xml::de::from_str(xml).map_err(|e| e.to_string())?;
    let blobs = parsed
        .blobs
        .blob
        .into_iter()
        .filter(|b| {
            !b.metadata
                .hdi_isfolder
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        })
        .map(|b| {
            let name = if b.name.encoded == Some(true) {
                percent_encoding::percent_decode_str(&b.name.value)
                    .decode_utf8_lossy()
                    .into_owned()
            } else {
                b.name.value
            };
            let md5 = b
                .properties
                .content_md5
                .as_deref()
                .filter(|s| !s.is_empty())
                .and_then(decode_md5);
            ObjectMeta {
                name,
                size: b.properties.content_length,
                md5,
                etag: b.properties.etag.filter(|e| !e.is_empty()),
            }
        })
        .collect();
    Ok(ListPage {
        blobs,
        next_marker: parsed.next_marker.filter(|m| !m.is_empty()),
    })
}

/// A base64 Content-MD5 value as 16 bytes; anything else is treated as absent.
pub fn decode_md5(b64: &str) -> Option<[u8; 16]> {
    B64.decode(b64.trim()).ok()?.try_into().ok()
}

/// Exchanges the federated service account token (projected by the AKS workload identity
/// webhook) for a storage access token.
async fn workload_identity_token(
    http: &reqwest::Client,
    client_id: &str,
) -> std::result::Result<(String, Duration), String> {
    let env = |name: &str| {
        std::env::var(name).map_err(|_| {
            format!("{name} is not set (is the workload identity webhook enabled for this pod?)")
        })
    };
    let token_file = env("AZURE_FEDERATED_TOKEN_FILE")?;
    let tenant = env("AZURE_TENANT_ID")?;
    let authority = std::env::var("AZURE_AUTHORITY_HOST")
        .unwrap_or_else(|_| "https://login.microsoftonline.com/".into());
    let assertion = tokio::fs::read_to_string(&token_file)
        .await
        .map_err(|e| format!("cannot read {token_file}: {e}"))?;
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", client_id)
        .append_pair("scope", "https://storage.azure.com/.default")
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", assertion.trim())
        .append_pair("grant_type", "client_credentials")
        .finish();
    let url = format!(
        "{}/{tenant}/oauth2/v2.0/token",
        authority.trim_end_matches('/')
    );
    let resp = http
        .post(&url)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(form)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.unwrap_or_default()).unwrap_or_default();
    if !status.is_success() {
        let reason = body
            .get("error_description")
            .and_then(|v| v.as_str())
            .unwrap_or("no description");
        return Err(format!(
            "{url} answered {status}: {}",
            reason.lines().next().unwrap_or("")
        ));
    }
    let token = body
        .get("access_token")
        .and_then(|v| v.as_str())
        .ok_or("the token response has no access_token")?;
    let ttl = body
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(3600);
    Ok((token.to_string(), Duration::from_secs(ttl)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_parses_names_sizes_md5_and_marker() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="http://x/" ContainerName="c"><Prefix>d</Prefix><MaxResults>2</MaxResults>
<Blobs>
<Blob><Name>d/a &amp; b.txt</Name><Properties><Content-Length>3</Content-Length><Content-MD5>kAFQmDzST7DWlj99KOF/cg==</Content-MD5></Properties></Blob>
<Blob><Name Encoded="true">d/%EF%BF%BEodd</Name><Properties><Content-Length>0</Content-Length><Content-MD5 /></Properties><Metadata><owner>x</owner></Metadata></Blob>
<Blob><Name>d/folder</Name><Properties><Content-Length>0</Content-Length></Properties><Metadata><hdi_isfolder>true</hdi_isfolder></Metadata></Blob>
</Blobs><NextMarker>2!abc</NextMarker></EnumerationResults>"#;
        let page = parse_list(xml).unwrap();
        assert_eq!(page.blobs.len(), 2);
        assert_eq!(page.blobs[0].name, "d/a & b.txt");
        assert_eq!(page.blobs[0].size, 3);
        assert_eq!(page.blobs[0].md5, decode_md5("kAFQmDzST7DWlj99KOF/cg=="));
        assert!(page.blobs[0].md5.is_some());
        assert_eq!(page.blobs[1].name, "d/\u{fffe}odd");
        assert_eq!(page.blobs[1].md5, None);
        assert_eq!(page.next_marker.as_deref(), Some("2!abc"));
    }

    #[test]
    fn empty_listing_has_no_marker() {
        let page =
            parse_list(r#"<EnumerationResults><Blobs /><NextMarker /></EnumerationResults>"#)
                .unwrap();
        assert!(page.blobs.is_empty());
        assert!(page.next_marker.is_none());
    }

    #[test]
    fn block_ids_have_one_length_and_differ_per_upload() {
        let (a, b) = (BlockIds::new(), BlockIds::new());
        assert_eq!(a.id(0).len(), a.id(49_999).len());
        assert_ne!(a.id(0), b.id(0));
    }
}
