//! Tenant isolation over one shared upstream key: each tenant sees and touches only what it
//! created.
//!
//! This module owns the ownership *rules*; the host glue owns the I/O (buffering bodies,
//! dispatching look-ups). It decides:
//! - which resources carry an owner: agents, sessions, environments and vaults
//!   ([`owned_kind`]). Every other object is reached through one of them in the path (threads,
//!   resources and events via their session, credentials via their vault, the work queue via
//!   its environment), so checking the parent is enough — assuming, as the API does, that the
//!   upstream resolves a child only under its own parent;
//! - where the owner is recorded: upstream, as one key ([`Ownership::tag_key`]) of the
//!   resource's `metadata`, written by [`tag_request_body`] on every create (and on updates
//!   that touch `metadata`) and removed from every response by [`rewrite_response`], so
//!   clients never see it and can neither claim nor erase it;
//! - where it is remembered: the [`Store`], key `ma_gateway.owner.<id>` ([`remember_owner`],
//!   [`cached_owner`]), learnt from responses and from look-ups ([`owner_from_lookup`]);
//! - whether a call may proceed ([`check`]): a foreign id gets exactly the 404 a missing one
//!   gets ([`not_found`]), so a tenant cannot even learn that another tenant's id exists.
//!
//! Assumed `metadata` limits (the API documents a string→string map; these bounds are our
//! assumption, kept deliberately conservative): at most [`METADATA_MAX_KEYS`] keys, keys of
//! at most [`METADATA_MAX_KEY_CHARS`] characters, values of at most
//! [`METADATA_MAX_VALUE_CHARS`]. Tagging never takes a request past them.

use serde_json::{Map, Value};

use crate::errors::{excerpt, ApiError, ErrorKind};
use crate::routes::{Action, Family, IdKind, Operation};
use crate::store::{self, Store, StoreError};
use crate::tag_strip;

/// The `metadata` key that records the owning tenant unless configured otherwise.
pub const DEFAULT_TAG_KEY: &str = "ma_gateway_tenant";
/// Assumed upstream limit on `metadata` keys per resource.
pub const METADATA_MAX_KEYS: usize = 16;
/// Assumed upstream limit on the length of a `metadata` key, in characters.
pub const METADATA_MAX_KEY_CHARS: usize = 64;
/// Assumed upstream limit on the length of a `metadata` value, in characters.
pub const METADATA_MAX_VALUE_CHARS: usize = 512;

/// Longest id we treat as one (the router's default bound; real ids are ~30 bytes).
const MAX_ID_BYTES: usize = 128;
const OWNER_KEY_PREFIX: &str = "ma_gateway.owner.";
/// Cache values: a tenant is `tenant:<name>`; the marker cannot collide with any name.
const TENANT_PREFIX: &str = "tenant:";
const UNTAGGED_MARKER: &str = "untagged";
/// CAS retries for one cache write; a lost race only costs a later look-up.
const CACHE_ATTEMPTS: usize = 4;

/// What to do with resources that carry no tag (created before or outside the gateway).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Untagged {
    /// Nobody may see or touch them (the safe default).
    #[default]
    Deny,
    /// Every tenant may see and touch them (a migration aid for pre-gateway resources).
    Allow,
}

/// The tenancy policy, from config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership<'a> {
    /// The `metadata` key holding the owner (see [`valid_tag_key`]).
    pub tag_key: &'a str,
    pub untagged: Untagged,
}

impl Default for Ownership<'static> {
    fn default() -> Self {
        Ownership {
            tag_key: DEFAULT_TAG_KEY,
            untagged: Untagged::Deny,
        }
    }
}

impl Ownership<'_> {
    /// Whether `tenant` may see and touch a resource with this owner.
    pub fn admits(&self, owner: &Owner, tenant: &str) -> bool {
        match owner {
            Owner::Tenant(name) => name == tenant,
            Owner::Untagged => self.untagged == Untagged::Allow,
        }
    }
}

/// Whether `key` fits the assumed `metadata` key limits (for config validation).
pub fn valid_tag_key(key: &str) -> bool {
    !key.is_empty()
        && key.chars().count() <= METADATA_MAX_KEY_CHARS
        && !key.chars().any(char::is_control)
}

/// Who owns a resource, as recorded upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Tenant(String),
    /// It exists upstream but carries no tag.
    Untagged,
}

impl Owner {
    /// Reads the owner from a resource object's `metadata`. A missing or non-object
    /// `metadata`, or a non-string tag (which the gateway never writes), counts as untagged.
    pub fn of(resource: &Value, tag_key: &str) -> Owner {
        match resource
            .get("metadata")
            .and_then(|m| m.get(tag_key))
            .and_then(Value::as_str)
        {
            Some(name) => Owner::Tenant(name.to_string()),
            None => Owner::Untagged,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Owner::Tenant(name) => format!("{TENANT_PREFIX}{name}").into_bytes(),
            Owner::Untagged => UNTAGGED_MARKER.as_bytes().to_vec(),
        }
    }

    fn decode(bytes: &[u8]) -> Option<Owner> {
        let text = std::str::from_utf8(bytes).ok()?;
        if text == UNTAGGED_MARKER {
            return Some(Owner::Untagged);
        }
        text.strip_prefix(TENANT_PREFIX)
            .map(|name| Owner::Tenant(name.to_string()))
    }
}

/// Whether ids of this kind carry an owner; every other kind is reached through one that does.
pub fn owned_kind(kind: IdKind) -> bool {
    owned_prefix(kind).is_some()
}

fn owned_prefix(kind: IdKind) -> Option<&'static str> {
    match kind {
        IdKind::Agent => Some("agent_"),
        IdKind::Session => Some("sesn_"),
        IdKind::Environment => Some("env_"),
        IdKind::Vault => Some("vlt_"),
        _ => None,
    }
}

const OWNED_KINDS: [IdKind; 4] = [
    IdKind::Agent,
    IdKind::Session,
    IdKind::Environment,
    IdKind::Vault,
];

/// Whether `id` is a well-formed id of the owned `kind`: its prefix, then `[A-Za-z0-9_-]`,
/// bounded — the same alphabet the router accepts, so an id we check is one a path can name.
fn is_owned_id(kind: IdKind, id: &str) -> bool {
    let Some(rest) = owned_prefix(kind).and_then(|p| id.strip_prefix(p)) else {
        return false;
    };
    id.len() <= MAX_ID_BYTES
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The owned kind a string is an id of, judged by prefix.
fn owned_id_kind(id: &str) -> Option<IdKind> {
    OWNED_KINDS.into_iter().find(|k| is_owned_id(*k, id))
}

/// The owned kind of the objects a family's top-level calls return.
fn family_kind(family: Family) -> Option<IdKind> {
    match family {
        Family::Agents => Some(IdKind::Agent),
        Family::Sessions => Some(IdKind::Session),
        Family::Environments => Some(IdKind::Environment),
        Family::Vaults => Some(IdKind::Vault),
        _ => None,
    }
}

/// The upstream path that reads one owned resource, e.g. `/v1/agents/agent_x`; `None` for
/// other kinds and malformed ids (so no caller-supplied text can shape the look-up path).
pub fn lookup_path(kind: IdKind, id: &str) -> Option<String> {
    if !is_owned_id(kind, id) {
        return None;
    }
    let family = match kind {
        IdKind::Agent => "agents",
        IdKind::Session => "sessions",
        IdKind::Environment => "environments",
        _ => "vaults",
    };
    Some(format!("/v1/{family}/{id}"))
}

/// The 404 for an id this tenant may not see. Foreign, untagged and missing ids all get this
/// exact error (the emulator's wording for a missing resource), so the answer reveals nothing.
pub fn not_found(kind: IdKind, id: &str) -> ApiError {
    let noun = match kind {
        IdKind::Agent => "agent",
        IdKind::Session => "session",
        IdKind::Thread => "thread",
        IdKind::SessionResource => "resource",
        IdKind::Environment => "environment",
        IdKind::Work => "work item",
        IdKind::Vault => "vault",
        IdKind::Credential => "credential",
        IdKind::File => "file",
        IdKind::Skill => "skill",
        IdKind::SkillVersion => "skill version",
        IdKind::MemoryStore => "memory store",
        IdKind::Memory => "memory",
        IdKind::Deployment => "deployment",
        IdKind::DeploymentRun => "deployment run",
        IdKind::MemoryVersion => "memory version",
        IdKind::Dream => "dream",
        IdKind::Tunnel => "tunnel",
        IdKind::TunnelCertificate => "tunnel certificate",
        IdKind::UserProfile => "user profile",
    };
    ApiError::new(
        ErrorKind::NotFound,
        format!("{noun} {} not found", excerpt(id, MAX_ID_BYTES)),
    )
    .because("ownership")
}

/// The store key caching the owner of `id`.
pub fn owner_key(id: &str) -> String {
    format!("{OWNER_KEY_PREFIX}{id}")
}

/// The cached owner of `id`, if it was ever learnt.
pub fn cached_owner(store: &dyn Store, id: &str) -> Option<Owner> {
    store
        .get(&owner_key(id))
        .and_then(|(bytes, _)| Owner::decode(&bytes))
}

/// Caches the owner of `id` (an owned-kind id; anything else is refused with
/// [`StoreError::Other`]). Writes nothing when the entry already says so, which keeps list
/// responses cheap. `Untagged` never replaces a known tenant: the only way a tag disappears
/// is an edit outside the gateway or a stale look-up racing a fresh answer, and keeping the
/// tenant is right in both cases. In production the entry lives in one of a fixed number of
/// hash-addressed slots ([`crate::bounded`]): a colliding id evicts it, and a later miss is
/// re-learnt by the upstream look-up like an id never seen.
pub fn remember_owner(store: &dyn Store, id: &str, owner: Owner) -> Result<(), StoreError> {
    if owned_id_kind(id).is_none() {
        return Err(StoreError::Other(format!(
            "not an owned resource id: {}",
            excerpt(id, 40)
        )));
    }
    store::update(store, &owner_key(id), CACHE_ATTEMPTS, |current| {
        match (current.and_then(Owner::decode), &owner) {
            (Some(known), new) if known == *new => None,
            (Some(Owner::Tenant(_)), Owner::Untagged) => None,
            _ => Some((owner.encode(), ())),
        }
    })
    .map(|_| ())
}

/// The owned ids a request's query string names as filters (`GET /v1/sessions?agent_id=…`),
/// in order, without duplicates. They are checked like path ids, so a filter naming another
/// tenant's id gets exactly the 404 an unknown id gets instead of a page that tells the two
/// apart (a cursor left over from the other tenant's filtered-out items).
///
/// A parameter is a filter when its name, percent-decoded and without a `[…]` suffix, is `id`
/// or ends in `_id` or `_ids`; each of its values (comma-separated lists too) is
/// percent-decoded, since the upstream decodes them, and counts when it is a well-formed owned
/// id. Other parameters (cursors, limits, free text) are never read.
pub fn query_references(path: &str) -> Vec<(IdKind, String)> {
    let mut refs = Refs::default();
    let Some((_, query)) = path.split_once('?') else {
        return refs.0;
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(key) = percent_decode(key) else {
            continue;
        };
        let name = key.split_once('[').map_or(key.as_str(), |(name, _)| name);
        if !(name == "id" || name.ends_with("_id") || name.ends_with("_ids")) {
            continue;
        }
        let Some(value) = percent_decode(value) else {
            continue;
        };
        for item in value.split(',') {
            if let Some(kind) = owned_id_kind(item) {
                refs.push(kind, item);
            }
        }
    }
    refs.0
}

/// `application/x-www-form-urlencoded` decoding of one query component (`+` is a space);
/// `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The outcome of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer with this error; never forward.
    Deny(ApiError),
    /// These owners are unknown: read each at [`lookup_path`], feed the answer through
    /// [`owner_from_lookup`] and [`remember_owner`], then check again.
    Lookup(Vec<(IdKind, String)>),
}

/// May `tenant` touch every owned id in `ids` (path ids and [`body_references`] alike)?
/// Ids of other kinds are skipped: their owned parent is in the same list. A denial wins over
/// unknowns (no look-up is wasted on a call that fails anyway); the first denied id is named.
pub fn check(
    store: &dyn Store,
    ownership: &Ownership<'_>,
    tenant: &str,
    ids: &[(IdKind, String)],
) -> Verdict {
    let mut unknown: Vec<(IdKind, String)> = Vec::new();
    for (kind, id) in ids.iter().filter(|(k, _)| owned_kind(*k)) {
        match cached_owner(store, id) {
            Some(owner) if ownership.admits(&owner, tenant) => {}
            Some(_) => return Verdict::Deny(not_found(*kind, id)),
            None => {
                if !unknown.iter().any(|(_, u)| u == id) {
                    unknown.push((*kind, id.clone()));
                }
            }
        }
    }
    if unknown.is_empty() {
        Verdict::Allow
    } else {
        Verdict::Lookup(unknown)
    }
}

/// The owned ids a request body refers to, in order, without duplicates.
///
/// - `POST /v1/sessions`: `agent` (an id string, or any object's `id` — whatever its `type`,
///   since an unknown type is refused upstream anyway — plus ids inside its `multiagent`),
///   `environment_id`, every `vault_ids[]`, and ids inside `resources[]`;
/// - `POST /v1/sessions/{id}`: `agent` as above, `vault_ids[]`, ids inside `resources[]`;
/// - agent create/update: ids inside `multiagent` (a coordinator's roster names agents);
/// - session resource create/update: ids anywhere in the body.
///
/// "Ids inside" means string values under a key `id` or `*_id`, or items of an array under
/// `*_ids`, that are well-formed owned ids; free text (prompts, URLs, tokens) is never read.
/// Anything of the wrong type or shape is not a reference: the upstream matches ids exactly
/// and will refuse it.
pub fn body_references(op: &Operation, body: &Value) -> Vec<(IdKind, String)> {
    let mut refs = Refs::default();
    match (op.family, op.action) {
        (Family::Sessions, Action::Create | Action::Update) => {
            if let Some(agent) = body.get("agent") {
                match agent {
                    Value::String(id) => refs.expect(IdKind::Agent, id),
                    Value::Object(fields) => {
                        if let Some(Value::String(id)) = fields.get("id") {
                            refs.expect(IdKind::Agent, id);
                        }
                        if let Some(roster) = fields.get("multiagent") {
                            refs.scan(roster);
                        }
                    }
                    _ => {}
                }
            }
            if let Some(Value::Array(vaults)) = body.get("vault_ids") {
                for vault in vaults {
                    if let Value::String(id) = vault {
                        refs.expect(IdKind::Vault, id);
                    }
                }
            }
            if op.action == Action::Create {
                if let Some(Value::String(id)) = body.get("environment_id") {
                    refs.expect(IdKind::Environment, id);
                }
            }
            // Not documented on update, but an update naming resources is checked like a
            // create rather than trusted to be refused upstream.
            if let Some(resources @ Value::Array(_)) = body.get("resources") {
                refs.scan(resources);
            }
        }
        (Family::Agents, Action::Create | Action::Update) => {
            if let Some(roster) = body.get("multiagent") {
                refs.scan(roster);
            }
        }
        (Family::SessionResources, Action::Create | Action::Update) => refs.scan(body),
        _ => {}
    }
    refs.0
}

#[derive(Default)]
struct Refs(Vec<(IdKind, String)>);

impl Refs {
    fn push(&mut self, kind: IdKind, id: &str) {
        if !self.0.iter().any(|(_, known)| known == id) {
            self.0.push((kind, id.to_string()));
        }
    }

    /// A field whose kind the API fixes: only a well-formed id of that kind refers to anything.
    fn expect(&mut self, kind: IdKind, id: &str) {
        if is_owned_id(kind, id) {
            self.push(kind, id);
        }
    }

    /// Collects owned ids under id-named keys anywhere in `value`.
    fn scan(&mut self, value: &Value) {
        match value {
            Value::Object(fields) => {
                for (key, v) in fields {
                    match v {
                        Value::String(s) if key == "id" || key.ends_with("_id") => {
                            if let Some(kind) = owned_id_kind(s) {
                                self.push(kind, s);
                            }
                        }
                        Value::Array(items) if key.ends_with("_ids") => {
                            for item in items {
                                match item.as_str().and_then(|s| owned_id_kind(s).map(|k| (k, s))) {
                                    Some((kind, s)) => self.push(kind, s),
                                    None => self.scan(item),
                                }
                            }
                        }
                        _ => self.scan(v),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| self.scan(item)),
            _ => {}
        }
    }
}

/// Tags a create (or a `metadata`-touching update) of an agent, session, environment or vault
/// with `metadata[tag_key] = tenant`, overriding whatever the client sent for that key.
/// `Ok(None)`: forward the body unchanged (another call, an update without `metadata`, or the
/// tag already right). `Ok(Some(bytes))`: forward these instead (re-serialised: same
/// content, object keys sorted). An empty create body is read as `{}` so that no create can
/// ever reach upstream untagged.
///
/// On update, `metadata: null` becomes `{tag: tenant}`: if the upstream read null as "clear",
/// the owner would otherwise be erased. The client's other keys keep their meaning (the
/// upstream merges a patch; a `null` value deletes that key).
pub fn tag_request_body(
    op: &Operation,
    body: &[u8],
    tenant: &str,
    ownership: &Ownership<'_>,
) -> Result<Option<Vec<u8>>, ApiError> {
    let create = match (family_kind(op.family), op.action) {
        (Some(_), Action::Create) => true,
        (Some(_), Action::Update) => false,
        _ => return Ok(None),
    };
    if !valid_tag_key(ownership.tag_key)
        || tenant.is_empty()
        || tenant.chars().count() > METADATA_MAX_VALUE_CHARS
    {
        // Config validation should make this unreachable; refusing beats forwarding untagged.
        return Err(ApiError::new(
            ErrorKind::Api,
            "gateway misconfiguration: the tenant cannot be recorded in metadata",
        ));
    }
    let empty = body.iter().all(u8::is_ascii_whitespace);
    if empty && !create {
        return Ok(None);
    }
    let mut value = if empty {
        Value::Object(Map::new())
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(e) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("invalid JSON body: {e}"),
                ))
            }
        }
    };
    let Value::Object(fields) = &mut value else {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "request body must be a JSON object",
        ));
    };
    match fields.get("metadata") {
        Some(Value::Object(_)) => {}
        None if !create => return Ok(None),
        None | Some(Value::Null) => {
            fields.insert("metadata".into(), Value::Object(Map::new()));
        }
        Some(_) => {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                "metadata: Input should be an object of string values",
            ))
        }
    }
    let Some(Value::Object(metadata)) = fields.get_mut("metadata") else {
        return Err(ApiError::new(
            ErrorKind::Api,
            "the gateway could not tag the request",
        ));
    };
    match metadata.get(ownership.tag_key) {
        Some(Value::String(current)) if current == tenant => return Ok(None),
        Some(_) => {}
        None if metadata.len() >= METADATA_MAX_KEYS => {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "metadata: at most {METADATA_MAX_KEYS} keys are allowed and this gateway \
                     reserves one ({:?}) to record the owning tenant; send at most {} keys",
                    ownership.tag_key,
                    METADATA_MAX_KEYS - 1
                ),
            ))
        }
        None => {}
    }
    metadata.insert(ownership.tag_key.into(), Value::String(tenant.into()));
    serde_json::to_vec(&value).map(Some).map_err(|_| {
        ApiError::new(
            ErrorKind::Api,
            "the gateway could not re-encode the request body",
        )
    })
}

/// What [`rewrite_response`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseRewrite {
    /// The body to send instead; `None`: send the upstream bytes unchanged.
    pub body: Option<Vec<u8>>,
    /// List items kept and dropped (single objects count in neither).
    pub kept: usize,
    pub dropped: usize,
    /// A 2xx body that should have been JSON was not; it is passed on unchanged.
    pub not_json: bool,
    /// Owners that could not be cached (they will be looked up again when needed).
    pub cache_errors: usize,
}

/// Which part of a family's responses this module rewrites.
enum Scope {
    /// Agents, sessions, environments, vaults: learn owners, filter lists, strip tags.
    Owned(IdKind),
    /// Objects reached through an owned parent that may embed tagged objects (agent
    /// versions, session snapshots in threads, credentials): strip tags only.
    StripOnly,
}

fn response_scope(family: Family) -> Option<Scope> {
    if let Some(kind) = family_kind(family) {
        return Some(Scope::Owned(kind));
    }
    match family {
        Family::AgentVersions
        | Family::SessionEvents
        | Family::SessionThreads
        | Family::SessionResources
        | Family::EnvironmentWork
        | Family::VaultCredentials => Some(Scope::StripOnly),
        _ => None,
    }
}

/// Whether the host buffers a 2xx response of `op` for [`rewrite_response`]: owned objects
/// and lists, and the small objects that embed them (threads with their agent snapshot,
/// session resources, work items, agent versions, credentials). Streams are never buffered,
/// and neither are event pages (session or thread `…/events`, up to 1000 events: more than
/// Envoy's default 1 MiB buffer).
pub fn rewrites(op: &Operation) -> bool {
    let events = op.family == Family::SessionEvents
        || (op.family == Family::SessionThreads
            && op.action == Action::List
            && op.id(IdKind::Thread).is_some());
    response_scope(op.family).is_some() && op.action != Action::Stream && !events
}

/// Rewrites a buffered 2xx JSON response so `tenant` sees only its own objects and never the
/// tag: single objects teach their owner and lose the tag (anywhere, e.g. in a session's
/// `agent` snapshot); list pages (`{"data":[…],…}`) teach every item's owner and keep only
/// what `tenant` may see, with `next_page`/`prev_page` untouched (a page may come back short
/// or empty while a cursor remains: clients follow cursors, not counts).
///
/// `Err` means "do not send the upstream body, answer this instead": a single object the
/// tenant may not see on read/update/archive (a stale cache, self-corrected here by the
/// `remember_owner` just made), or a list page of an owned family that cannot be parsed, which
/// fails closed because it cannot be filtered. Non-2xx answers, streams and other families
/// pass through untouched.
pub fn rewrite_response(
    op: &Operation,
    status: u32,
    body: &[u8],
    tenant: &str,
    ownership: &Ownership<'_>,
    store: &dyn Store,
) -> Result<ResponseRewrite, ApiError> {
    let mut out = ResponseRewrite::default();
    let Some(scope) = response_scope(op.family) else {
        return Ok(out);
    };
    if !(200..300).contains(&status)
        || op.action == Action::Stream
        || body.iter().all(u8::is_ascii_whitespace)
    {
        return Ok(out);
    }
    let owned_list = matches!(scope, Scope::Owned(_)) && op.action == Action::List;
    if !owned_list {
        // Fast path for single objects: one pass over the bytes, no `Value` (see tag_strip);
        // `None` means it could not be sure, and the `Value` path below decides.
        if let Some(fast) = tag_strip::strip(body, ownership.tag_key) {
            if let Scope::Owned(kind) = scope {
                if op.action != Action::Delete {
                    let owner = fast.owner.map_or(Owner::Untagged, Owner::Tenant);
                    let id = fast.id.as_deref();
                    check_single(op, kind, id, &owner, tenant, ownership, store, &mut out)?;
                }
            }
            out.body = fast.body;
            return Ok(out);
        }
    }
    let unreadable_list = || {
        ApiError::new(
            ErrorKind::Api,
            "the gateway could not read the upstream list response",
        )
    };
    let mut value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if owned_list => return Err(unreadable_list()),
        Err(_) => {
            out.not_json = true;
            return Ok(out);
        }
    };
    let mut changed = false;
    let learn = |item: &Value, kind: IdKind, owner: &Owner, errors: &mut usize| {
        if let Some(id) = item.get("id").and_then(Value::as_str) {
            if is_owned_id(kind, id) && remember_owner(store, id, owner.clone()).is_err() {
                *errors += 1;
            }
        }
    };
    if let Scope::Owned(kind) = scope {
        if owned_list {
            let Some(Value::Array(items)) = value.get_mut("data") else {
                return Err(unreadable_list());
            };
            let before = items.len();
            let mut errors = 0;
            items.retain(|item| {
                let owner = Owner::of(item, ownership.tag_key);
                learn(item, kind, &owner, &mut errors);
                item.is_object() && ownership.admits(&owner, tenant)
            });
            out.kept = items.len();
            out.dropped = before - items.len();
            out.cache_errors = errors;
            changed = out.dropped > 0;
        } else if value.is_object() && op.action != Action::Delete {
            // Delete answers are markers without metadata: they would read as untagged.
            let owner = Owner::of(&value, ownership.tag_key);
            let id = value.get("id").and_then(Value::as_str);
            check_single(op, kind, id, &owner, tenant, ownership, store, &mut out)?;
        }
    }
    changed |= strip_tags(&mut value, ownership.tag_key);
    if changed {
        out.body = Some(serde_json::to_vec(&value).map_err(|_| {
            ApiError::new(
                ErrorKind::Api,
                "the gateway could not re-encode the response",
            )
        })?);
    }
    Ok(out)
}

/// A single object of an owned family in a 2xx answer: teaches its owner, and refuses it when
/// `tenant` may not see it (except on create: the call made it, so it is the caller's).
#[allow(clippy::too_many_arguments)]
fn check_single(
    op: &Operation,
    kind: IdKind,
    id: Option<&str>,
    owner: &Owner,
    tenant: &str,
    ownership: &Ownership<'_>,
    store: &dyn Store,
    out: &mut ResponseRewrite,
) -> Result<(), ApiError> {
    if let Some(id) = id {
        if is_owned_id(kind, id) && remember_owner(store, id, owner.clone()).is_err() {
            out.cache_errors += 1;
        }
    }
    let visible = ownership.admits(owner, tenant);
    if !visible && op.action == Action::Create {
        // The upstream dropped the tag.
        log::warn!(
            "tenancy: {} created for tenant {tenant} came back without its owner tag",
            op.family.as_str()
        );
    } else if !visible {
        let id = op.id(kind).or(id).unwrap_or_default();
        return Err(not_found(kind, id));
    }
    Ok(())
}

/// Removes `tag_key` from every `metadata` object at any depth; true when anything went.
/// (Recursion is bounded: serde_json refuses input nested deeper than 128.)
fn strip_tags(value: &mut Value, tag_key: &str) -> bool {
    match value {
        Value::Object(fields) => {
            let mut changed = match fields.get_mut("metadata") {
                Some(Value::Object(metadata)) => metadata.remove(tag_key).is_some(),
                _ => false,
            };
            for v in fields.values_mut() {
                changed |= strip_tags(v, tag_key);
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| strip_tags(v, tag_key) | changed),
        _ => false,
    }
}

/// The answer to a `GET` at [`lookup_path`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupResult {
    Owner(Owner),
    /// 404: the resource does not exist; answer [`not_found`] (never forward, so the wording
    /// is the gateway's for missing and foreign ids alike). Not cached.
    Missing,
    /// Anything else (5xx, 429, unreadable body): the owner is unknown; fail closed.
    Failed,
}

/// Reads the owner out of a look-up answer.
pub fn owner_from_lookup(status: u32, body: &[u8], tag_key: &str) -> LookupResult {
    match status {
        200..=299 => match serde_json::from_slice::<Value>(body) {
            Ok(value @ Value::Object(_)) => LookupResult::Owner(Owner::of(&value, tag_key)),
            _ => LookupResult::Failed,
        },
        404 => LookupResult::Missing,
        _ => LookupResult::Failed,
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::routes::{classify, RouteRules};
    use crate::store::MemoryStore;
    use serde_json::json;

    const TAG: &str = DEFAULT_TAG_KEY;

    fn op(method: &str, path: &str) -> Operation {
        classify(&RouteRules::default(), method, path).unwrap()
    }

    fn deny() -> Ownership<'static> {
        Ownership::default()
    }

    fn allow() -> Ownership<'static> {
        Ownership {
            untagged: Untagged::Allow,
            ..Ownership::default()
        }
    }

    fn tag(method: &str, path: &str, body: &str) -> Result<Option<String>, ApiError> {
        tag_request_body(&op(method, path), body.as_bytes(), "acme", &deny())
            .map(|b| b.map(|b| String::from_utf8(b).unwrap()))
    }

    /// Found by fuzzing (fuzz/ tenancy_request): without serde_json's `float_roundtrip`, a
    /// re-encoded body carried `3.3333333333333336e+41` for the client's `…332e+41`.
    #[test]
    fn tagging_keeps_the_clients_numbers_exactly() {
        for number in [
            "3.3333333333333332e+41",
            "0.1",
            "1e-300",
            "123456789.12345678",
            "-0.0",
        ] {
            let body = format!(r#"{{"name":"a","model":"m","x":{number}}}"#);
            let tagged = tag("POST", "/v1/agents", &body).unwrap().unwrap();
            let sent: Value = serde_json::from_str(&body).unwrap();
            let got: Value = serde_json::from_str(&tagged).unwrap();
            let bits = |v: &Value| v["x"].as_f64().unwrap().to_bits();
            assert_eq!(bits(&got), bits(&sent), "{number} became {}", got["x"]);
        }
    }

    fn ids(list: &[(IdKind, &str)]) -> Vec<(IdKind, String)> {
        list.iter().map(|(k, s)| (*k, s.to_string())).collect()
    }

    fn store_with(entries: &[(&str, Owner)]) -> MemoryStore {
        let store = MemoryStore::new();
        for (id, owner) in entries {
            remember_owner(&store, id, owner.clone()).unwrap();
        }
        store
    }

    fn rewrite(
        method: &str,
        path: &str,
        status: u32,
        body: &Value,
        ownership: &Ownership<'_>,
        store: &MemoryStore,
    ) -> Result<ResponseRewrite, ApiError> {
        let bytes = serde_json::to_vec(body).unwrap();
        rewrite_response(&op(method, path), status, &bytes, "acme", ownership, store)
    }

    fn body_json(rewrite: &ResponseRewrite) -> Value {
        serde_json::from_slice(rewrite.body.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn responses_buffered_for_rewriting() {
        let buffered = |method: &str, path: &str| rewrites(&op(method, path));
        for (method, path) in [
            ("GET", "/v1/agents"),
            ("GET", "/v1/agents/agent_1/versions"),
            ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions/sesn_1/threads"),
            ("GET", "/v1/sessions/sesn_1/threads/sthr_1"),
            ("POST", "/v1/sessions/sesn_1/threads/sthr_1/archive"),
            ("GET", "/v1/sessions/sesn_1/resources"),
            ("POST", "/v1/sessions/sesn_1/resources"),
            ("GET", "/v1/environments/env_1/work"),
            ("GET", "/v1/vaults/vlt_1/credentials"),
        ] {
            assert!(buffered(method, path), "{method} {path}");
        }
        for (method, path) in [
            ("GET", "/v1/sessions/sesn_1/events"),
            ("POST", "/v1/sessions/sesn_1/events"),
            ("GET", "/v1/sessions/sesn_1/events/stream"),
            ("GET", "/v1/sessions/sesn_1/stream"),
            ("GET", "/v1/sessions/sesn_1/threads/sthr_1/events"),
            ("GET", "/v1/sessions/sesn_1/threads/sthr_1/stream"),
        ] {
            assert!(!buffered(method, path), "{method} {path}");
        }
    }

    #[test]
    fn query_filters_naming_owned_ids_are_references() {
        let got = query_references(
            "/v1/sessions?limit=1&agent_id=agent_a1&page=agent_cursor1&environment_id=env_e1",
        );
        assert_eq!(
            got,
            ids(&[(IdKind::Agent, "agent_a1"), (IdKind::Environment, "env_e1")])
        );
        // Percent-encoded keys and values, brackets, lists, duplicates.
        assert_eq!(
            query_references(
                "/v1/x?agent%5Fid=%61gent_a2&vault_ids[]=vlt_1,vlt_2&vault_ids[]=vlt_1&id=sesn_s"
            ),
            ids(&[
                (IdKind::Agent, "agent_a2"),
                (IdKind::Vault, "vlt_1"),
                (IdKind::Vault, "vlt_2"),
                (IdKind::Session, "sesn_s")
            ])
        );
        // Not filters, not owned, malformed: nothing.
        for path in [
            "/v1/sessions",
            "/v1/sessions?",
            "/v1/sessions?title=agent_a1&page=sesn_1",
            "/v1/sessions?file_id=file_1&agent_id=agent_",
            "/v1/sessions?agent_id=agent_a%2",
            "/v1/sessions?agent_id=agent_a%FF",
            "/v1/sessions?agent_id=agent_a%2Fb",
        ] {
            assert_eq!(query_references(path), vec![], "{path}");
        }
    }

    #[test]
    fn owned_kinds_and_lookup_paths() {
        let owned: Vec<IdKind> = [
            IdKind::Agent,
            IdKind::Session,
            IdKind::Thread,
            IdKind::Environment,
            IdKind::Vault,
            IdKind::Credential,
            IdKind::File,
        ]
        .into_iter()
        .filter(|k| owned_kind(*k))
        .collect();
        assert_eq!(
            owned,
            vec![
                IdKind::Agent,
                IdKind::Session,
                IdKind::Environment,
                IdKind::Vault
            ]
        );
        assert_eq!(
            lookup_path(IdKind::Agent, "agent_x1").as_deref(),
            Some("/v1/agents/agent_x1")
        );
        assert_eq!(
            lookup_path(IdKind::Session, "sesn_1").as_deref(),
            Some("/v1/sessions/sesn_1")
        );
        assert_eq!(
            lookup_path(IdKind::Environment, "env_1").as_deref(),
            Some("/v1/environments/env_1")
        );
        assert_eq!(
            lookup_path(IdKind::Vault, "vlt_1").as_deref(),
            Some("/v1/vaults/vlt_1")
        );
        // Wrong kind, wrong prefix, path tricks, empty body of the id, overlong.
        assert_eq!(lookup_path(IdKind::Credential, "vcrd_1"), None);
        assert_eq!(lookup_path(IdKind::Agent, "sesn_1"), None);
        assert_eq!(lookup_path(IdKind::Agent, "agent_../x"), None);
        assert_eq!(lookup_path(IdKind::Agent, "agent_"), None);
        assert_eq!(
            lookup_path(IdKind::Agent, &format!("agent_{}", "a".repeat(123))),
            None
        );
    }

    #[test]
    fn create_without_metadata_gets_the_tag() {
        assert_eq!(
            tag(
                "POST",
                "/v1/agents",
                r#"{"name":"a","model":"claude-opus-4-8"}"#
            )
            .unwrap(),
            Some(
                r#"{"metadata":{"ma_gateway_tenant":"acme"},"model":"claude-opus-4-8","name":"a"}"#
                    .into()
            )
        );
        // metadata: null and an empty body both become a tagged object.
        assert_eq!(
            tag("POST", "/v1/vaults", r#"{"name":"v","metadata":null}"#).unwrap(),
            Some(r#"{"metadata":{"ma_gateway_tenant":"acme"},"name":"v"}"#.into())
        );
        assert_eq!(
            tag("POST", "/v1/environments", " ").unwrap(),
            Some(r#"{"metadata":{"ma_gateway_tenant":"acme"}}"#.into())
        );
    }

    #[test]
    fn create_keeps_client_metadata_and_overrides_the_tag() {
        assert_eq!(
            tag(
                "POST",
                "/v1/sessions",
                r#"{"agent":"agent_1","environment_id":"env_1","metadata":{"team":"x"}}"#
            )
            .unwrap(),
            Some(
                r#"{"agent":"agent_1","environment_id":"env_1","metadata":{"ma_gateway_tenant":"acme","team":"x"}}"#
                    .into()
            )
        );
        // A client claiming another tenant's ownership is overridden.
        assert_eq!(
            tag(
                "POST",
                "/v1/agents",
                r#"{"name":"a","metadata":{"ma_gateway_tenant":"globex"}}"#
            )
            .unwrap(),
            Some(r#"{"metadata":{"ma_gateway_tenant":"acme"},"name":"a"}"#.into())
        );
        // Already right: nothing to rewrite.
        assert_eq!(
            tag(
                "POST",
                "/v1/agents",
                r#"{"name":"a","metadata":{"ma_gateway_tenant":"acme"}}"#
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn metadata_key_limit_is_kept() {
        let keys = |n: usize| -> String {
            let fields: Vec<String> = (0..n).map(|i| format!(r#""k{i:02}":"v""#)).collect();
            format!(r#"{{"name":"a","metadata":{{{}}}}}"#, fields.join(","))
        };
        let err = tag("POST", "/v1/agents", &keys(16)).unwrap_err();
        assert_eq!(
            err,
            ApiError::new(
                ErrorKind::InvalidRequest,
                "metadata: at most 16 keys are allowed and this gateway reserves one \
                 (\"ma_gateway_tenant\") to record the owning tenant; send at most 15 keys"
            )
        );
        assert_eq!(err.status(), 400);
        let tagged = tag("POST", "/v1/agents", &keys(15)).unwrap().unwrap();
        let value: Value = serde_json::from_str(&tagged).unwrap();
        assert_eq!(value["metadata"].as_object().unwrap().len(), 16);
        assert_eq!(value["metadata"][TAG], "acme");
        // 16 keys of which one is ours (claiming another tenant): replaced, still 16.
        let mut fields: Vec<String> = (0..15).map(|i| format!(r#""k{i:02}":"v""#)).collect();
        fields.push(r#""ma_gateway_tenant":"globex""#.into());
        let body = format!(r#"{{"metadata":{{{}}}}}"#, fields.join(","));
        let tagged = tag("POST", "/v1/vaults", &body).unwrap().unwrap();
        let value: Value = serde_json::from_str(&tagged).unwrap();
        assert_eq!(value["metadata"].as_object().unwrap().len(), 16);
        assert_eq!(value["metadata"][TAG], "acme");
    }

    #[test]
    fn update_is_tagged_only_when_it_touches_metadata() {
        assert_eq!(
            tag("POST", "/v1/agents/agent_1", r#"{"version":2,"name":"b"}"#).unwrap(),
            None
        );
        assert_eq!(
            tag(
                "POST",
                "/v1/sessions/sesn_1",
                r#"{"metadata":{"ma_gateway_tenant":null,"x":"1"}}"#
            )
            .unwrap(),
            Some(r#"{"metadata":{"ma_gateway_tenant":"acme","x":"1"}}"#.into())
        );
        assert_eq!(
            tag("POST", "/v1/environments/env_1", r#"{"metadata":null}"#).unwrap(),
            Some(r#"{"metadata":{"ma_gateway_tenant":"acme"}}"#.into())
        );
        // An empty update body has nothing to tag (upstream judges it).
        assert_eq!(tag("POST", "/v1/vaults/vlt_1", "").unwrap(), None);
    }

    #[test]
    fn other_calls_are_not_tagged_and_bad_bodies_are_refused() {
        // Not an owned family's create/update: untouched, not even parsed.
        assert_eq!(
            tag("POST", "/v1/sessions/sesn_1/events", "not json").unwrap(),
            None
        );
        assert_eq!(
            tag("POST", "/v1/vaults/vlt_1/credentials", "{}").unwrap(),
            None
        );
        assert_eq!(tag("POST", "/v1/agents/agent_1/archive", "").unwrap(), None);
        let err = tag("POST", "/v1/agents", "{").unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert!(
            err.message.starts_with("invalid JSON body: "),
            "{}",
            err.message
        );
        assert_eq!(
            tag("POST", "/v1/agents", "[1]").unwrap_err(),
            ApiError::new(
                ErrorKind::InvalidRequest,
                "request body must be a JSON object"
            )
        );
        assert_eq!(
            tag("POST", "/v1/agents", r#"{"metadata":"x"}"#).unwrap_err(),
            ApiError::new(
                ErrorKind::InvalidRequest,
                "metadata: Input should be an object of string values"
            )
        );
        let bad_key = Ownership {
            tag_key: "",
            ..deny()
        };
        assert_eq!(
            tag_request_body(&op("POST", "/v1/agents"), b"{}", "acme", &bad_key)
                .unwrap_err()
                .status(),
            500
        );
        assert!(valid_tag_key(DEFAULT_TAG_KEY));
        assert!(!valid_tag_key(&"k".repeat(65)));
    }

    #[test]
    fn session_create_references_every_agent_form() {
        let create = op("POST", "/v1/sessions");
        let cases = [
            json!({"agent": "agent_a", "environment_id": "env_1"}),
            json!({"agent": {"type": "agent", "id": "agent_a", "version": 3},
                   "environment_id": "env_1"}),
            json!({"agent": {"type": "agent_with_overrides", "id": "agent_a", "model": "m"},
                   "environment_id": "env_1"}),
        ];
        for body in cases {
            assert_eq!(
                body_references(&create, &body),
                ids(&[(IdKind::Agent, "agent_a"), (IdKind::Environment, "env_1")]),
                "{body}"
            );
        }
    }

    #[test]
    fn session_create_references_vaults_and_resources() {
        let body = json!({
            "agent": "agent_a",
            "environment_id": "env_1",
            "vault_ids": ["vlt_1", "vlt_2", "vlt_1"],
            "resources": [
                {"type": "session", "session_id": "sesn_9"},
                {"type": "file", "file_id": "file_1"},
                {"type": "github_repository", "url": "https://github.com/o/agent_x",
                 "authorization_token": "env_looks_like_an_id"},
                {"type": "vaults", "vault_ids": ["vlt_3"]}
            ],
            "initial_events": [{"type": "user.message", "content": [{"type": "text", "text": "agent_z"}]}]
        });
        assert_eq!(
            body_references(&op("POST", "/v1/sessions"), &body),
            ids(&[
                (IdKind::Agent, "agent_a"),
                (IdKind::Vault, "vlt_1"),
                (IdKind::Vault, "vlt_2"),
                (IdKind::Environment, "env_1"),
                (IdKind::Session, "sesn_9"),
                (IdKind::Vault, "vlt_3"),
            ])
        );
    }

    #[test]
    fn wrong_types_are_not_references() {
        let body = json!({
            "agent": 5,
            "environment_id": ["env_1"],
            "vault_ids": "vlt_1",
            "resources": {"session_id": "sesn_1"}
        });
        assert_eq!(body_references(&op("POST", "/v1/sessions"), &body), vec![]);
        // Wrong prefix for the field, or malformed: not a reference (upstream refuses it).
        let body = json!({"agent": {"id": "sesn_1"}, "environment_id": "vlt_1",
                          "vault_ids": [1, "vlt_ok", "vlt_/../x"]});
        assert_eq!(
            body_references(&op("POST", "/v1/sessions"), &body),
            ids(&[(IdKind::Vault, "vlt_ok")])
        );
    }

    #[test]
    fn session_update_and_agent_roster_references() {
        let body = json!({"title": "t", "agent": {"id": "agent_b", "tools": []},
                          "vault_ids": ["vlt_1"], "environment_id": "env_ignored"});
        assert_eq!(
            body_references(&op("POST", "/v1/sessions/sesn_1"), &body),
            ids(&[(IdKind::Agent, "agent_b"), (IdKind::Vault, "vlt_1")])
        );
        // Resources are not documented on update; named there, they are still checked.
        assert_eq!(
            body_references(
                &op("POST", "/v1/sessions/sesn_1"),
                &json!({"resources": [{"type": "vaults", "vault_ids": ["vlt_7"]},
                                      {"type": "session", "session_id": "sesn_8"}]})
            ),
            ids(&[(IdKind::Vault, "vlt_7"), (IdKind::Session, "sesn_8")])
        );
        assert_eq!(
            body_references(
                &op("POST", "/v1/sessions/sesn_1"),
                &json!({"agent": {"tools": []}})
            ),
            vec![]
        );
        let coordinator = json!({"name": "c", "system": "agent_q",
            "multiagent": {"type": "coordinator", "agents": [
                {"type": "agent", "id": "agent_r1", "name": "R"},
                {"type": "self"},
                {"type": "agent", "id": "agent_r2", "version": 2}]}});
        let expected = ids(&[(IdKind::Agent, "agent_r1"), (IdKind::Agent, "agent_r2")]);
        assert_eq!(
            body_references(&op("POST", "/v1/agents"), &coordinator),
            expected
        );
        assert_eq!(
            body_references(&op("POST", "/v1/agents/agent_c"), &coordinator),
            expected
        );
        assert_eq!(
            body_references(
                &op("POST", "/v1/sessions/sesn_1/resources"),
                &json!({"type": "session", "session_id": "sesn_2"})
            ),
            ids(&[(IdKind::Session, "sesn_2")])
        );
        assert_eq!(
            body_references(&op("POST", "/v1/sessions/sesn_1/events"), &coordinator),
            vec![]
        );
    }

    #[test]
    fn check_allows_denies_and_asks_for_lookups() {
        let store = store_with(&[
            ("sesn_mine", Owner::Tenant("acme".into())),
            ("agent_mine", Owner::Tenant("acme".into())),
            ("agent_theirs", Owner::Tenant("globex".into())),
            ("env_old", Owner::Untagged),
        ]);
        let policy = deny();
        // Non-owned kinds ride on their parent and are skipped.
        assert_eq!(
            check(
                &store,
                &policy,
                "acme",
                &ids(&[(IdKind::Session, "sesn_mine"), (IdKind::Thread, "sthr_1")])
            ),
            Verdict::Allow
        );
        assert_eq!(
            check(
                &store,
                &policy,
                "acme",
                &ids(&[(IdKind::Agent, "agent_theirs")])
            ),
            Verdict::Deny(
                ApiError::new(ErrorKind::NotFound, "agent agent_theirs not found")
                    .because("ownership")
            )
        );
        assert_eq!(
            check(
                &store,
                &policy,
                "acme",
                &ids(&[
                    (IdKind::Agent, "agent_new"),
                    (IdKind::Agent, "agent_mine"),
                    (IdKind::Vault, "vlt_new"),
                    (IdKind::Agent, "agent_new"),
                ])
            ),
            Verdict::Lookup(ids(&[
                (IdKind::Agent, "agent_new"),
                (IdKind::Vault, "vlt_new")
            ]))
        );
        // A denial wins over unknowns.
        assert_eq!(
            check(
                &store,
                &policy,
                "acme",
                &ids(&[
                    (IdKind::Agent, "agent_new"),
                    (IdKind::Environment, "env_old")
                ])
            ),
            Verdict::Deny(
                ApiError::new(ErrorKind::NotFound, "environment env_old not found")
                    .because("ownership")
            )
        );
        // The owner itself is fine; another tenant is not.
        assert_eq!(
            check(
                &store,
                &policy,
                "globex",
                &ids(&[(IdKind::Agent, "agent_theirs")])
            ),
            Verdict::Allow
        );
        assert_eq!(check(&store, &policy, "acme", &[]), Verdict::Allow);
    }

    #[test]
    fn untagged_policy_both_ways() {
        let store = store_with(&[("env_old", Owner::Untagged)]);
        let env = ids(&[(IdKind::Environment, "env_old")]);
        assert_eq!(check(&store, &allow(), "acme", &env), Verdict::Allow);
        assert_eq!(
            check(&store, &deny(), "acme", &env),
            Verdict::Deny(not_found(IdKind::Environment, "env_old"))
        );
    }

    #[test]
    fn foreign_untagged_and_missing_ids_get_the_same_answer() {
        let store = store_with(&[
            ("vlt_foreign", Owner::Tenant("globex".into())),
            ("vlt_untagged", Owner::Untagged),
        ]);
        let message = |id: &str| match check(&store, &deny(), "acme", &ids(&[(IdKind::Vault, id)]))
        {
            Verdict::Deny(e) => (
                e.status(),
                e.kind.wire_name(),
                e.message.replace(id, "<id>"),
            ),
            other => panic!("{other:?}"),
        };
        let missing = not_found(IdKind::Vault, "vlt_missing");
        let missing = (
            missing.status(),
            missing.kind.wire_name(),
            missing.message.replace("vlt_missing", "<id>"),
        );
        assert_eq!(
            missing,
            (404, "not_found_error", "vault <id> not found".into())
        );
        assert_eq!(message("vlt_foreign"), missing);
        assert_eq!(message("vlt_untagged"), missing);
        for (kind, word) in [
            (IdKind::Agent, "agent"),
            (IdKind::Session, "session"),
            (IdKind::Environment, "environment"),
        ] {
            assert_eq!(
                not_found(kind, "x_1").message,
                format!("{word} x_1 not found")
            );
        }
    }

    #[test]
    fn owner_cache_roundtrip_and_no_downgrade() {
        let store = MemoryStore::new();
        assert_eq!(cached_owner(&store, "agent_1"), None);
        remember_owner(&store, "agent_1", Owner::Tenant("acme".into())).unwrap();
        assert_eq!(
            store.value("ma_gateway.owner.agent_1").unwrap(),
            b"tenant:acme"
        );
        assert_eq!(
            cached_owner(&store, "agent_1"),
            Some(Owner::Tenant("acme".into()))
        );
        // Same owner again: no write. Untagged never replaces a tenant.
        remember_owner(&store, "agent_1", Owner::Tenant("acme".into())).unwrap();
        remember_owner(&store, "agent_1", Owner::Untagged).unwrap();
        assert_eq!(store.writes(), 1);
        assert_eq!(
            cached_owner(&store, "agent_1"),
            Some(Owner::Tenant("acme".into()))
        );
        // Untagged, then claimed.
        remember_owner(&store, "env_1", Owner::Untagged).unwrap();
        assert_eq!(store.value("ma_gateway.owner.env_1").unwrap(), b"untagged");
        assert_eq!(cached_owner(&store, "env_1"), Some(Owner::Untagged));
        remember_owner(&store, "env_1", Owner::Tenant("acme".into())).unwrap();
        assert_eq!(
            cached_owner(&store, "env_1"),
            Some(Owner::Tenant("acme".into()))
        );
        assert_eq!(store.writes(), 3);
        // Not an owned id; garbage and tombstones read as unknown.
        assert!(remember_owner(&store, "vcrd_1", Owner::Untagged).is_err());
        store.set("ma_gateway.owner.vlt_1", b"junk", None).unwrap();
        store.set("ma_gateway.owner.vlt_2", b"", None).unwrap();
        assert_eq!(cached_owner(&store, "vlt_1"), None);
        assert_eq!(cached_owner(&store, "vlt_2"), None);
        // A full store is reported, not fatal.
        let full = MemoryStore::with_max_keys(0);
        assert_eq!(
            remember_owner(&full, "vlt_1", Owner::Untagged),
            Err(StoreError::Full)
        );
    }

    fn agent(id: &str, owner: Option<&str>) -> Value {
        let mut metadata = json!({"team": "x"});
        if let Some(owner) = owner {
            metadata[TAG] = json!(owner);
        }
        json!({"id": id, "type": "agent", "metadata": metadata})
    }

    fn page() -> Value {
        json!({
            "data": [
                agent("agent_1", Some("acme")),
                agent("agent_2", Some("globex")),
                agent("agent_3", None),
                agent("agent_4", Some("acme")),
                "junk"
            ],
            "next_page": "cur_next",
            "prev_page": "cur_prev"
        })
    }

    #[test]
    fn list_pages_are_filtered_keep_cursors_and_teach_owners() {
        let store = MemoryStore::new();
        let out = rewrite("GET", "/v1/agents?limit=5", 200, &page(), &deny(), &store).unwrap();
        assert_eq!(
            (out.kept, out.dropped, out.not_json, out.cache_errors),
            (2, 3, false, 0)
        );
        assert_eq!(
            body_json(&out),
            json!({
                "data": [
                    {"id": "agent_1", "type": "agent", "metadata": {"team": "x"}},
                    {"id": "agent_4", "type": "agent", "metadata": {"team": "x"}}
                ],
                "next_page": "cur_next",
                "prev_page": "cur_prev"
            })
        );
        assert_eq!(
            cached_owner(&store, "agent_1"),
            Some(Owner::Tenant("acme".into()))
        );
        assert_eq!(
            cached_owner(&store, "agent_2"),
            Some(Owner::Tenant("globex".into()))
        );
        assert_eq!(cached_owner(&store, "agent_3"), Some(Owner::Untagged));
        // With untagged allowed, the untagged item stays (tag-free as ever).
        let out = rewrite("GET", "/v1/agents", 200, &page(), &allow(), &store).unwrap();
        assert_eq!((out.kept, out.dropped), (3, 2));
        let kept: Vec<Value> = body_json(&out)["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].clone())
            .collect();
        assert_eq!(
            kept,
            vec![json!("agent_1"), json!("agent_3"), json!("agent_4")]
        );
        // An empty page of someone else's items keeps its cursor.
        let theirs = json!({"data": [agent("agent_2", Some("globex"))], "next_page": "c2"});
        let out = rewrite("GET", "/v1/agents", 200, &theirs, &deny(), &store).unwrap();
        assert_eq!(body_json(&out), json!({"data": [], "next_page": "c2"}));
    }

    #[test]
    fn session_objects_lose_the_tag_everywhere() {
        let store = MemoryStore::new();
        let session = json!({
            "id": "sesn_1",
            "type": "session",
            "metadata": {TAG: "acme", "k": "v"},
            "agent": {"id": "agent_1", "type": "agent", "metadata": {TAG: "acme"},
                      "multiagent": {"agents": [{"id": "agent_2", "metadata": {TAG: "acme"}}]}},
            "environment_id": "env_1"
        });
        let out = rewrite("POST", "/v1/sessions", 200, &session, &deny(), &store).unwrap();
        assert_eq!(
            body_json(&out),
            json!({
                "id": "sesn_1",
                "type": "session",
                "metadata": {"k": "v"},
                "agent": {"id": "agent_1", "type": "agent", "metadata": {},
                          "multiagent": {"agents": [{"id": "agent_2", "metadata": {}}]}},
                "environment_id": "env_1"
            })
        );
        assert_eq!((out.kept, out.dropped), (0, 0));
        assert_eq!(
            cached_owner(&store, "sesn_1"),
            Some(Owner::Tenant("acme".into()))
        );
        // Snapshots teach nothing: the embedded agent is not cached.
        assert_eq!(cached_owner(&store, "agent_1"), None);
        // A thread's agent snapshot is stripped too.
        let thread = json!({"id": "sthr_1", "agent": {"metadata": {TAG: "acme"}}});
        let out = rewrite(
            "GET",
            "/v1/sessions/sesn_1/threads/sthr_1",
            200,
            &thread,
            &deny(),
            &store,
        )
        .unwrap();
        assert_eq!(
            body_json(&out),
            json!({"id": "sthr_1", "agent": {"metadata": {}}})
        );
    }

    #[test]
    fn single_objects_of_other_tenants_are_not_sent() {
        let store = store_with(&[("vlt_1", Owner::Tenant("acme".into()))]);
        // The cache said acme, the resource now says globex: the truth wins and is learnt.
        let vault = json!({"id": "vlt_1", "type": "vault", "metadata": {TAG: "globex"}});
        assert_eq!(
            rewrite("GET", "/v1/vaults/vlt_1", 200, &vault, &deny(), &store),
            Err(ApiError::new(ErrorKind::NotFound, "vault vlt_1 not found").because("ownership"))
        );
        assert_eq!(
            cached_owner(&store, "vlt_1"),
            Some(Owner::Tenant("globex".into()))
        );
        // An untagged agent is readable only under Allow.
        let old = json!({"id": "agent_9", "metadata": {}});
        assert_eq!(
            rewrite("GET", "/v1/agents/agent_9", 200, &old, &deny(), &store),
            Err(not_found(IdKind::Agent, "agent_9"))
        );
        let out = rewrite("GET", "/v1/agents/agent_9", 200, &old, &allow(), &store).unwrap();
        assert_eq!(out, ResponseRewrite::default());
        // A create that came back untagged is still sent (the caller made it) and learnt.
        let made = json!({"id": "env_5", "metadata": {}});
        let out = rewrite("POST", "/v1/environments", 200, &made, &deny(), &store).unwrap();
        assert_eq!(out.body, None);
        assert_eq!(cached_owner(&store, "env_5"), Some(Owner::Untagged));
        // Delete markers teach nothing.
        let gone = json!({"id": "sesn_7", "type": "session_deleted"});
        let out = rewrite("DELETE", "/v1/sessions/sesn_7", 200, &gone, &deny(), &store).unwrap();
        assert_eq!(out, ResponseRewrite::default());
        assert_eq!(cached_owner(&store, "sesn_7"), None);
    }

    #[test]
    fn versions_and_credentials_are_stripped_not_filtered() {
        let store = MemoryStore::new();
        let versions = json!({"data": [agent("agent_1", Some("acme")), agent("agent_1", None)],
                              "next_page": null});
        let out = rewrite(
            "GET",
            "/v1/agents/agent_1/versions",
            200,
            &versions,
            &deny(),
            &store,
        )
        .unwrap();
        assert_eq!((out.kept, out.dropped), (0, 0));
        assert_eq!(
            body_json(&out),
            json!({"data": [agent("agent_1", None), agent("agent_1", None)], "next_page": null})
        );
        assert_eq!(cached_owner(&store, "agent_1"), None);
        let credential = json!({"id": "vcrd_1", "vault_id": "vlt_1", "metadata": {TAG: "x"}});
        let out = rewrite(
            "GET",
            "/v1/vaults/vlt_1/credentials/vcrd_1",
            200,
            &credential,
            &deny(),
            &store,
        )
        .unwrap();
        assert_eq!(
            body_json(&out),
            json!({"id": "vcrd_1", "vault_id": "vlt_1", "metadata": {}})
        );
    }

    #[test]
    fn non_json_errors_and_other_families_pass_through() {
        let store = MemoryStore::new();
        let read = op("GET", "/v1/sessions/sesn_1");
        let out = rewrite_response(&read, 200, b"<html>", "acme", &deny(), &store).unwrap();
        assert_eq!(
            out,
            ResponseRewrite {
                not_json: true,
                ..ResponseRewrite::default()
            }
        );
        // An owned list that cannot be read fails closed.
        let list = op("GET", "/v1/sessions");
        let unreadable = ApiError::new(
            ErrorKind::Api,
            "the gateway could not read the upstream list response",
        );
        assert_eq!(
            rewrite_response(&list, 200, b"<html>", "acme", &deny(), &store),
            Err(unreadable.clone())
        );
        assert_eq!(
            rewrite_response(&list, 200, br#"{"items":[]}"#, "acme", &deny(), &store),
            Err(unreadable)
        );
        // Errors, empty bodies, streams and neighbours are untouched.
        let error = br#"{"type":"error","error":{"type":"not_found_error","message":"m"}}"#;
        for (operation, status, body) in [
            (&read, 404, &error[..]),
            (&read, 204, &b""[..]),
            (
                &op("GET", "/v1/sessions/sesn_1/stream"),
                200,
                &b"event: x\n"[..],
            ),
        ] {
            assert_eq!(
                rewrite_response(operation, status, body, "acme", &deny(), &store),
                Ok(ResponseRewrite::default())
            );
        }
        assert!(store.is_empty());
        // A tag-free object needs no new body.
        let clean = json!({"id": "sesn_1", "metadata": {}});
        let out = rewrite(
            "GET",
            "/v1/sessions/sesn_1/events",
            200,
            &clean,
            &deny(),
            &store,
        )
        .unwrap();
        assert_eq!(out.body, None);
    }

    #[test]
    fn lookups_read_the_owner() {
        let tagged = br#"{"id":"agent_1","metadata":{"ma_gateway_tenant":"acme"}}"#;
        assert_eq!(
            owner_from_lookup(200, tagged, TAG),
            LookupResult::Owner(Owner::Tenant("acme".into()))
        );
        assert_eq!(
            owner_from_lookup(200, br#"{"id":"agent_1","metadata":{}}"#, TAG),
            LookupResult::Owner(Owner::Untagged)
        );
        assert_eq!(
            owner_from_lookup(200, tagged, "other_key"),
            LookupResult::Owner(Owner::Untagged)
        );
        assert_eq!(owner_from_lookup(404, b"{}", TAG), LookupResult::Missing);
        assert_eq!(owner_from_lookup(500, tagged, TAG), LookupResult::Failed);
        assert_eq!(owner_from_lookup(429, b"", TAG), LookupResult::Failed);
        assert_eq!(owner_from_lookup(200, b"[]", TAG), LookupResult::Failed);
        assert_eq!(owner_from_lookup(200, b"nope", TAG), LookupResult::Failed);
    }
}
