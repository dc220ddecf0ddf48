//! Classifies a request's `(method, path)` into a Managed Agents [`Operation`], or refuses it.
//!
//! This is the default-deny gate: only paths that spell an endpoint of the Managed Agents API
//! exactly (lowercase literal segments, ids with the right prefix and alphabet, no dot
//! segments, no doubled slashes, no percent-encoding, bounded length) are classified; anything
//! else is `None` and the gateway answers 404 without contacting upstream. Envoy normalises
//! paths before us (see `envoy.yaml`), and this check does not rely on it: a crafted path can
//! never be forwarded classified as something it is not.
//!
//! The query string is not interpreted here (it is forwarded untouched); only `?` and what
//! follows it is split off.

/// The resource family an endpoint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Agents,
    AgentVersions,
    Sessions,
    SessionEvents,
    SessionThreads,
    SessionResources,
    Environments,
    EnvironmentWork,
    Vaults,
    VaultCredentials,
    Files,
    Skills,
    MemoryStores,
    Deployments,
    DeploymentRuns,
    Memories,
    MemoryVersions,
    Dreams,
    Tunnels,
    TunnelCertificates,
    UserProfiles,
}

impl Family {
    /// Every family (scopes and the config schema enumerate them).
    pub const ALL: [Family; 21] = [
        Family::Agents,
        Family::AgentVersions,
        Family::Sessions,
        Family::SessionEvents,
        Family::SessionThreads,
        Family::SessionResources,
        Family::Environments,
        Family::EnvironmentWork,
        Family::Vaults,
        Family::VaultCredentials,
        Family::Files,
        Family::Skills,
        Family::MemoryStores,
        Family::Deployments,
        Family::DeploymentRuns,
        Family::Memories,
        Family::MemoryVersions,
        Family::Dreams,
        Family::Tunnels,
        Family::TunnelCertificates,
        Family::UserProfiles,
    ];

    /// Stable snake_case name, used in config (scopes), logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Agents => "agents",
            Family::AgentVersions => "agent_versions",
            Family::Sessions => "sessions",
            Family::SessionEvents => "session_events",
            Family::SessionThreads => "session_threads",
            Family::SessionResources => "session_resources",
            Family::Environments => "environments",
            Family::EnvironmentWork => "environment_work",
            Family::Vaults => "vaults",
            Family::VaultCredentials => "vault_credentials",
            Family::Files => "files",
            Family::Skills => "skills",
            Family::MemoryStores => "memory_stores",
            Family::Deployments => "deployments",
            Family::DeploymentRuns => "deployment_runs",
            Family::Memories => "memories",
            Family::MemoryVersions => "memory_versions",
            Family::Dreams => "dreams",
            Family::Tunnels => "tunnels",
            Family::TunnelCertificates => "tunnel_certificates",
            Family::UserProfiles => "user_profiles",
        }
    }

    /// Generally available APIs (Files, Skills, User Profiles): the current SDKs send no
    /// `anthropic-beta` on them, so the gateway neither requires nor adds one there.
    pub fn is_ga(self) -> bool {
        matches!(self, Family::Files | Family::Skills | Family::UserProfiles)
    }
}

/// What the call does to its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Read,
    List,
    Update,
    Delete,
    Archive,
    /// A server-sent-events stream (never buffered).
    Stream,
    /// `POST /v1/sessions/{id}/events`.
    SendEvents,
    /// `GET /v1/environments/{id}/work/poll`: claims a queued work item (and its secret).
    Poll,
    /// Calls whose answer is a credential or a bearer-like link: tunnel `reveal_token` and
    /// `rotate_token`, user-profile `action_urls` and `enrollment_url`.
    Reveal,
    /// `POST /v1/deployments/{id}/run`: starts a deployment run (a session).
    Run,
    /// `POST /v1/vaults/{id}/credentials/{id}/mcp_oauth_validate`: a live upstream probe.
    Validate,
}

impl Action {
    /// Every action (scopes and the config schema enumerate them).
    pub const ALL: [Action; 12] = [
        Action::Create,
        Action::Read,
        Action::List,
        Action::Update,
        Action::Delete,
        Action::Archive,
        Action::Stream,
        Action::SendEvents,
        Action::Poll,
        Action::Reveal,
        Action::Run,
        Action::Validate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Read => "read",
            Action::List => "list",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Archive => "archive",
            Action::Stream => "stream",
            Action::SendEvents => "send_events",
            Action::Poll => "poll",
            Action::Reveal => "reveal",
            Action::Run => "run",
            Action::Validate => "validate",
        }
    }
}

/// Exhaustive on purpose: a new [`Family`] variant stops the build here (list it in
/// [`Family::ALL`]).
#[allow(dead_code)]
fn family_guard(family: Family) {
    match family {
        Family::Agents
        | Family::AgentVersions
        | Family::Sessions
        | Family::SessionEvents
        | Family::SessionThreads
        | Family::SessionResources
        | Family::Environments
        | Family::EnvironmentWork
        | Family::Vaults
        | Family::VaultCredentials
        | Family::Files
        | Family::Skills
        | Family::MemoryStores
        | Family::Deployments
        | Family::DeploymentRuns
        | Family::Memories
        | Family::MemoryVersions
        | Family::Dreams
        | Family::Tunnels
        | Family::TunnelCertificates
        | Family::UserProfiles => {}
    }
}

/// Exhaustive on purpose: a new [`Action`] variant stops the build here (list it in
/// [`Action::ALL`]).
#[allow(dead_code)]
fn action_guard(action: Action) {
    match action {
        Action::Create
        | Action::Read
        | Action::List
        | Action::Update
        | Action::Delete
        | Action::Archive
        | Action::Stream
        | Action::SendEvents
        | Action::Poll
        | Action::Reveal
        | Action::Run
        | Action::Validate => {}
    }
}

/// The neighbouring APIs that are routed only when the operator enables them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Neighbour {
    Files,
    Skills,
    MemoryStores,
    Deployments,
    Dreams,
    Tunnels,
    UserProfiles,
}

impl Neighbour {
    pub const ALL: [Neighbour; 7] = [
        Neighbour::Files,
        Neighbour::Skills,
        Neighbour::MemoryStores,
        Neighbour::Deployments,
        Neighbour::Dreams,
        Neighbour::Tunnels,
        Neighbour::UserProfiles,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Neighbour::Files => "files",
            Neighbour::Skills => "skills",
            Neighbour::MemoryStores => "memory_stores",
            Neighbour::Deployments => "deployments",
            Neighbour::Dreams => "dreams",
            Neighbour::Tunnels => "tunnels",
            Neighbour::UserProfiles => "user_profiles",
        }
    }

    pub fn parse(name: &str) -> Option<Neighbour> {
        Neighbour::ALL.into_iter().find(|n| n.as_str() == name)
    }
}

/// The kind of an id found in a path; each known kind has the upstream's id prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdKind {
    Agent,
    Session,
    Thread,
    SessionResource,
    Environment,
    Work,
    Vault,
    Credential,
    File,
    Skill,
    SkillVersion,
    MemoryStore,
    Memory,
    Deployment,
    DeploymentRun,
    MemoryVersion,
    Dream,
    Tunnel,
    TunnelCertificate,
    UserProfile,
}

impl IdKind {
    /// Every kind (the audit redacts ids of each by their prefix).
    pub const ALL: [IdKind; 20] = [
        IdKind::Agent,
        IdKind::Session,
        IdKind::Thread,
        IdKind::SessionResource,
        IdKind::Environment,
        IdKind::Work,
        IdKind::Vault,
        IdKind::Credential,
        IdKind::File,
        IdKind::Skill,
        IdKind::SkillVersion,
        IdKind::MemoryStore,
        IdKind::Memory,
        IdKind::Deployment,
        IdKind::DeploymentRun,
        IdKind::MemoryVersion,
        IdKind::Dream,
        IdKind::Tunnel,
        IdKind::TunnelCertificate,
        IdKind::UserProfile,
    ];

    /// The prefix every id of this kind starts with, where the API documents one.
    pub fn prefix(self) -> Option<&'static str> {
        match self {
            IdKind::Agent => Some("agent_"),
            IdKind::Session => Some("sesn_"),
            IdKind::Thread => Some("sthr_"),
            IdKind::Environment => Some("env_"),
            IdKind::Vault => Some("vlt_"),
            IdKind::Credential => Some("vcrd_"),
            IdKind::File => Some("file_"),
            IdKind::Skill => Some("skill_"),
            IdKind::MemoryStore => Some("memstore_"),
            IdKind::Deployment => Some("depl_"),
            IdKind::DeploymentRun => Some("drun_"),
            IdKind::MemoryVersion => Some("memver_"),
            IdKind::Dream => Some("drm_"),
            IdKind::Tunnel => Some("tnl_"),
            IdKind::TunnelCertificate => Some("tcrt_"),
            IdKind::UserProfile => Some("uprof_"),
            IdKind::Memory => Some("mem_"),
            // The emulator still issues `sres_…` resource ids and the API `sesrsc_…`; work
            // ids are not checked either (`work_…` upstream).
            IdKind::SessionResource | IdKind::Work | IdKind::SkillVersion => None,
        }
    }
}

/// A classified call: e.g. `GET /v1/sessions/sesn_1/events/stream` is
/// `{family: SessionEvents, action: Stream, ids: [(Session, "sesn_1")]}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub family: Family,
    pub action: Action,
    pub ids: Vec<(IdKind, String)>,
}

impl Operation {
    /// The id of the given kind this path names, if any.
    pub fn id(&self, kind: IdKind) -> Option<&str> {
        self.ids
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_stream(&self) -> bool {
        self.action == Action::Stream
    }
}

/// Limits the classifier applies; from the plugin config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRules {
    pub max_path_bytes: usize,
    pub max_id_bytes: usize,
    pub neighbours: Vec<Neighbour>,
    /// Routed neighbours the operator declared shared between tenants on purpose.
    pub shared_neighbours: Vec<Neighbour>,
}

impl Default for RouteRules {
    fn default() -> Self {
        RouteRules {
            max_path_bytes: 2048,
            max_id_bytes: 128,
            neighbours: Vec::new(),
            shared_neighbours: Vec::new(),
        }
    }
}

impl RouteRules {
    /// The first routed neighbour (index in `neighbours`) not declared shared. No neighbour
    /// carries an owner — files and skills are created by multipart uploads (no JSON body to
    /// tag), memory stores document no `metadata`, and deployments (which do) come with their
    /// runs, created by the upstream and reached by `drun_…` id alone — so under tenant
    /// isolation routing one would silently share it; config refuses that unless declared.
    pub fn unisolated_neighbour(&self) -> Option<(usize, Neighbour)> {
        self.neighbours
            .iter()
            .enumerate()
            .find(|(_, n)| !self.shared_neighbours.contains(n))
            .map(|(i, n)| (i, *n))
    }
}

/// The HTTP methods the API uses; anything else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Delete,
}

/// Classifies `method` and `path` (which may carry a query string). `None` means: not a
/// Managed Agents endpoint this gateway routes — answer 404.
pub fn classify(rules: &RouteRules, method: &str, path: &str) -> Option<Operation> {
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        _ => return None,
    };
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path.len() > rules.max_path_bytes || !path.bytes().all(is_path_byte) {
        return None;
    }
    let rest = path.strip_prefix("/v1/")?;
    // split('/') keeps empty segments, so "//", a trailing "/" and "/v1/" alone all fail below.
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.len() > 6 || segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    Classifier { rules }.classify(method, &segments)
}

/// Bytes allowed in a path we forward: unreserved characters and `/`. Rejecting `%` means an
/// encoded slash, dot or NUL can never hide inside a segment; `.`-only segments fail the id
/// alphabet too.
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.')
}

struct Classifier<'r> {
    rules: &'r RouteRules,
}

/// Shorthand for building operations inside the big match below.
fn op(family: Family, action: Action, ids: Vec<(IdKind, String)>) -> Option<Operation> {
    Some(Operation {
        family,
        action,
        ids,
    })
}

impl Classifier<'_> {
    /// A work item id: work ids carry no checked prefix, so the queue's own words are not ids.
    fn work(&self, segment: &str) -> Option<(IdKind, String)> {
        if matches!(segment, "poll" | "stats") {
            return None;
        }
        self.id(IdKind::Work, segment)
    }

    /// Validates one id segment: right prefix (when the kind has one), then only
    /// `[A-Za-z0-9_-]` (no dots: "." and ".." are never ids), bounded length.
    fn id(&self, kind: IdKind, segment: &str) -> Option<(IdKind, String)> {
        if segment.len() > self.rules.max_id_bytes {
            return None;
        }
        let body = match kind.prefix() {
            Some(prefix) => segment.strip_prefix(prefix)?,
            None => segment,
        };
        let well_formed = !body.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        well_formed.then(|| (kind, segment.to_string()))
    }

    fn neighbour(&self, n: Neighbour) -> Option<()> {
        self.rules.neighbours.contains(&n).then_some(())
    }

    fn classify(&self, m: Method, segs: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Delete as DEL, Get as GET, Post as POST};
        match segs {
            ["agents", rest @ ..] => self.agents(m, rest),
            ["sessions", rest @ ..] => self.sessions(m, rest),
            ["environments", rest @ ..] => self.environments(m, rest),
            ["vaults", rest @ ..] => self.vaults(m, rest),
            ["files", rest @ ..] => {
                self.neighbour(Neighbour::Files)?;
                match (m, rest) {
                    (POST, []) => op(Files, Create, vec![]),
                    (GET, []) => op(Files, List, vec![]),
                    (GET, [f]) | (GET, [f, "content"]) => {
                        op(Files, Read, vec![self.id(IdKind::File, f)?])
                    }
                    (DEL, [f]) => op(Files, Delete, vec![self.id(IdKind::File, f)?]),
                    _ => None,
                }
            }
            ["skills", rest @ ..] => {
                self.neighbour(Neighbour::Skills)?;
                match (m, rest) {
                    (POST, []) => op(Skills, Create, vec![]),
                    (GET, []) => op(Skills, List, vec![]),
                    (GET, [s]) => op(Skills, Read, vec![self.id(IdKind::Skill, s)?]),
                    (DEL, [s]) => op(Skills, Delete, vec![self.id(IdKind::Skill, s)?]),
                    (POST, [s, "versions"]) => op(Skills, Update, vec![self.id(IdKind::Skill, s)?]),
                    (GET, [s, "versions"]) => op(Skills, List, vec![self.id(IdKind::Skill, s)?]),
                    (GET, [s, "versions", v]) | (DEL, [s, "versions", v]) => {
                        let action = if m == GET { Read } else { Delete };
                        let ids = vec![
                            self.id(IdKind::Skill, s)?,
                            self.id(IdKind::SkillVersion, v)?,
                        ];
                        op(Skills, action, ids)
                    }
                    _ => None,
                }
            }
            ["memory_stores", rest @ ..] => {
                self.neighbour(Neighbour::MemoryStores)?;
                self.memory_stores(m, rest)
            }
            ["deployments", rest @ ..] => {
                self.neighbour(Neighbour::Deployments)?;
                let depl = |s: &str| self.id(IdKind::Deployment, s);
                match (m, rest) {
                    (POST, []) => op(Deployments, Create, vec![]),
                    (GET, []) => op(Deployments, List, vec![]),
                    (GET, [d]) => op(Deployments, Read, vec![depl(d)?]),
                    (POST, [d]) => op(Deployments, Update, vec![depl(d)?]),
                    (DEL, [d]) => op(Deployments, Delete, vec![depl(d)?]),
                    (POST, [d, "archive"]) => op(Deployments, Archive, vec![depl(d)?]),
                    (POST, [d, "pause" | "unpause"]) => op(Deployments, Update, vec![depl(d)?]),
                    (POST, [d, "run"]) => op(Deployments, Run, vec![depl(d)?]),
                    _ => None,
                }
            }
            // Runs are append-only records the upstream creates (schedules, `…/run`).
            ["deployment_runs", rest @ ..] => {
                self.neighbour(Neighbour::Deployments)?;
                match (m, rest) {
                    (GET, []) => op(DeploymentRuns, List, vec![]),
                    (GET, [r]) => op(
                        DeploymentRuns,
                        Read,
                        vec![self.id(IdKind::DeploymentRun, r)?],
                    ),
                    _ => None,
                }
            }
            ["dreams", rest @ ..] => {
                self.neighbour(Neighbour::Dreams)?;
                let dream = |s: &str| self.id(IdKind::Dream, s);
                match (m, rest) {
                    (POST, []) => op(Dreams, Create, vec![]),
                    (GET, []) => op(Dreams, List, vec![]),
                    (GET, [d]) => op(Dreams, Read, vec![dream(d)?]),
                    (POST, [d, "cancel"]) => op(Dreams, Update, vec![dream(d)?]),
                    (POST, [d, "archive"]) => op(Dreams, Archive, vec![dream(d)?]),
                    _ => None,
                }
            }
            ["tunnels", rest @ ..] => {
                self.neighbour(Neighbour::Tunnels)?;
                self.tunnels(m, rest)
            }
            ["user_profiles", rest @ ..] => {
                self.neighbour(Neighbour::UserProfiles)?;
                let (u, tail) = match rest {
                    [] => {
                        return match m {
                            POST => op(UserProfiles, Create, vec![]),
                            GET => op(UserProfiles, List, vec![]),
                            DEL => None,
                        }
                    }
                    [u, tail @ ..] => (self.id(IdKind::UserProfile, u)?, tail),
                };
                match (m, tail) {
                    (GET, []) => op(UserProfiles, Read, vec![u]),
                    (POST, []) => op(UserProfiles, Update, vec![u]),
                    (DEL, []) => op(UserProfiles, Delete, vec![u]),
                    // Both answer a bearer-like link (`url`): its own action, never `read`.
                    (POST, ["action_urls" | "enrollment_url"]) => op(UserProfiles, Reveal, vec![u]),
                    (GET, ["providers", "google", "data_controls"]) => {
                        op(UserProfiles, Read, vec![u])
                    }
                    (POST, ["providers", "google", "data_controls"]) => {
                        op(UserProfiles, Update, vec![u])
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn memory_stores(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Delete as DEL, Get as GET, Post as POST};
        let (s, tail) = match rest {
            [] => {
                return match m {
                    POST => op(MemoryStores, Create, vec![]),
                    GET => op(MemoryStores, List, vec![]),
                    DEL => None,
                }
            }
            [s, tail @ ..] => (self.id(IdKind::MemoryStore, s)?, tail),
        };
        let with = |extra: (IdKind, String)| vec![s.clone(), extra];
        let memory = |x: &str| self.id(IdKind::Memory, x);
        let version = |x: &str| self.id(IdKind::MemoryVersion, x);
        match (m, tail) {
            (GET, []) => op(MemoryStores, Read, vec![s]),
            (POST, []) => op(MemoryStores, Update, vec![s]),
            (DEL, []) => op(MemoryStores, Delete, vec![s]),
            (POST, ["archive"]) => op(MemoryStores, Archive, vec![s]),
            (POST, ["memories"]) => op(Memories, Create, vec![s]),
            (GET, ["memories"]) => op(Memories, List, vec![s]),
            (GET, ["memories", x]) => op(Memories, Read, with(memory(x)?)),
            (POST, ["memories", x]) => op(Memories, Update, with(memory(x)?)),
            (DEL, ["memories", x]) => op(Memories, Delete, with(memory(x)?)),
            (GET, ["memory_versions"]) => op(MemoryVersions, List, vec![s]),
            (GET, ["memory_versions", v]) => op(MemoryVersions, Read, with(version(v)?)),
            // Redaction erases a version's content for good: a delete, not an update.
            (POST, ["memory_versions", v, "redact"]) => {
                op(MemoryVersions, Delete, with(version(v)?))
            }
            _ => None,
        }
    }

    fn tunnels(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Get as GET, Post as POST};
        let (t, tail) = match rest {
            [] => {
                return match m {
                    POST => op(Tunnels, Create, vec![]),
                    GET => op(Tunnels, List, vec![]),
                    _ => None,
                }
            }
            [t, tail @ ..] => (self.id(IdKind::Tunnel, t)?, tail),
        };
        let cert = |c: &str| self.id(IdKind::TunnelCertificate, c);
        match (m, tail) {
            (GET, []) => op(Tunnels, Read, vec![t]),
            (POST, ["archive"]) => op(Tunnels, Archive, vec![t]),
            // Both answer the tunnel's `tunnel_token`: a credential, so its own action.
            (POST, ["reveal_token" | "rotate_token"]) => op(Tunnels, Reveal, vec![t]),
            (POST, ["certificates"]) => op(TunnelCertificates, Create, vec![t]),
            (GET, ["certificates"]) => op(TunnelCertificates, List, vec![t]),
            (GET, ["certificates", c]) => op(TunnelCertificates, Read, vec![t, cert(c)?]),
            (POST, ["certificates", c, "archive"]) => {
                op(TunnelCertificates, Archive, vec![t, cert(c)?])
            }
            _ => None,
        }
    }

    fn agents(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Get as GET, Post as POST};
        let agent = |s: &str| self.id(IdKind::Agent, s);
        match (m, rest) {
            (POST, []) => op(Agents, Create, vec![]),
            (GET, []) => op(Agents, List, vec![]),
            (GET, [a]) => op(Agents, Read, vec![agent(a)?]),
            (POST, [a]) => op(Agents, Update, vec![agent(a)?]),
            (POST, [a, "archive"]) => op(Agents, Archive, vec![agent(a)?]),
            (GET, [a, "versions"]) => op(AgentVersions, List, vec![agent(a)?]),
            _ => None,
        }
    }

    fn sessions(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Delete as DEL, Get as GET, Post as POST};
        let (s, tail) = match rest {
            [] => {
                return match m {
                    POST => op(Sessions, Create, vec![]),
                    GET => op(Sessions, List, vec![]),
                    DEL => None,
                }
            }
            [s, tail @ ..] => (self.id(IdKind::Session, s)?, tail),
        };
        let with = |extra: Vec<(IdKind, String)>| {
            let mut ids = vec![s.clone()];
            ids.extend(extra);
            ids
        };
        let thread = |t: &str| self.id(IdKind::Thread, t);
        let resource = |r: &str| self.id(IdKind::SessionResource, r);
        match (m, tail) {
            (GET, []) => op(Sessions, Read, with(vec![])),
            (POST, []) => op(Sessions, Update, with(vec![])),
            (DEL, []) => op(Sessions, Delete, with(vec![])),
            (POST, ["archive"]) => op(Sessions, Archive, with(vec![])),
            (POST, ["events"]) => op(SessionEvents, SendEvents, with(vec![])),
            (GET, ["events"]) => op(SessionEvents, List, with(vec![])),
            // Both spellings of the one SSE stream: the SDKs use the first, the docs' curl the second.
            (GET, ["events", "stream"]) | (GET, ["stream"]) => {
                op(SessionEvents, Stream, with(vec![]))
            }
            (GET, ["threads"]) => op(SessionThreads, List, with(vec![])),
            (GET, ["threads", t]) => op(SessionThreads, Read, with(vec![thread(t)?])),
            (POST, ["threads", t, "archive"]) => {
                op(SessionThreads, Archive, with(vec![thread(t)?]))
            }
            (GET, ["threads", t, "events"]) => op(SessionThreads, List, with(vec![thread(t)?])),
            (GET, ["threads", t, "stream"]) => op(SessionThreads, Stream, with(vec![thread(t)?])),
            (GET, ["resources"]) => op(SessionResources, List, with(vec![])),
            (POST, ["resources"]) => op(SessionResources, Create, with(vec![])),
            (GET, ["resources", r]) => op(SessionResources, Read, with(vec![resource(r)?])),
            (POST, ["resources", r]) => op(SessionResources, Update, with(vec![resource(r)?])),
            (DEL, ["resources", r]) => op(SessionResources, Delete, with(vec![resource(r)?])),
            _ => None,
        }
    }

    fn environments(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Delete as DEL, Get as GET, Post as POST};
        let (e, tail) = match rest {
            [] => {
                return match m {
                    POST => op(Environments, Create, vec![]),
                    GET => op(Environments, List, vec![]),
                    DEL => None,
                }
            }
            [e, tail @ ..] => (self.id(IdKind::Environment, e)?, tail),
        };
        match (m, tail) {
            (GET, []) => op(Environments, Read, vec![e]),
            (POST, []) => op(Environments, Update, vec![e]),
            (DEL, []) => op(Environments, Delete, vec![e]),
            (POST, ["archive"]) => op(Environments, Archive, vec![e]),
            // The self-hosted work queue: workers poll, then act on one item. Every call names
            // the environment first, so the tenant check on `env_…` covers the whole queue.
            (GET, ["work"]) => op(EnvironmentWork, List, vec![e]),
            (GET, ["work", "poll"]) => op(EnvironmentWork, Poll, vec![e]),
            (GET, ["work", "stats"]) => op(EnvironmentWork, Read, vec![e]),
            (GET, ["work", w]) => op(EnvironmentWork, Read, vec![e, self.work(w)?]),
            (POST, ["work", w]) => op(EnvironmentWork, Update, vec![e, self.work(w)?]),
            (POST, ["work", w, "ack" | "heartbeat" | "stop"]) => {
                op(EnvironmentWork, Update, vec![e, self.work(w)?])
            }
            _ => None,
        }
    }

    fn vaults(&self, m: Method, rest: &[&str]) -> Option<Operation> {
        use Action::*;
        use Family::*;
        use Method::{Delete as DEL, Get as GET, Post as POST};
        let (v, tail) = match rest {
            [] => {
                return match m {
                    POST => op(Vaults, Create, vec![]),
                    GET => op(Vaults, List, vec![]),
                    DEL => None,
                }
            }
            [v, tail @ ..] => (self.id(IdKind::Vault, v)?, tail),
        };
        let cred = |c: &str| self.id(IdKind::Credential, c);
        match (m, tail) {
            (GET, []) => op(Vaults, Read, vec![v]),
            (POST, []) => op(Vaults, Update, vec![v]),
            (DEL, []) => op(Vaults, Delete, vec![v]),
            (POST, ["archive"]) => op(Vaults, Archive, vec![v]),
            (POST, ["credentials"]) => op(VaultCredentials, Create, vec![v]),
            (GET, ["credentials"]) => op(VaultCredentials, List, vec![v]),
            (GET, ["credentials", c]) => op(VaultCredentials, Read, vec![v, cred(c)?]),
            (POST, ["credentials", c]) => op(VaultCredentials, Update, vec![v, cred(c)?]),
            (DEL, ["credentials", c]) => op(VaultCredentials, Delete, vec![v, cred(c)?]),
            (POST, ["credentials", c, "archive"]) => {
                op(VaultCredentials, Archive, vec![v, cred(c)?])
            }
            (POST, ["credentials", c, "mcp_oauth_validate"]) => {
                op(VaultCredentials, Validate, vec![v, cred(c)?])
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use Action::*;
    use Family::*;

    fn all_neighbours() -> RouteRules {
        RouteRules {
            neighbours: Neighbour::ALL.to_vec(),
            ..RouteRules::default()
        }
    }

    fn check(method: &str, path: &str) -> Option<(Family, Action, Vec<&'static str>)> {
        classify(&all_neighbours(), method, path).map(|op| {
            let ids = op
                .ids
                .iter()
                .map(|(_, v)| &*Box::leak(v.clone().into_boxed_str()))
                .collect();
            (op.family, op.action, ids)
        })
    }

    #[test]
    fn every_documented_endpoint_is_classified() {
        let table: &[(&str, &str, Family, Action, &[&str])] = &[
            ("POST", "/v1/agents", Agents, Create, &[]),
            (
                "GET",
                "/v1/agents?limit=100&page=abc&include_archived=true",
                Agents,
                List,
                &[],
            ),
            (
                "GET",
                "/v1/agents/agent_01?version=2",
                Agents,
                Read,
                &["agent_01"],
            ),
            ("POST", "/v1/agents/agent_01", Agents, Update, &["agent_01"]),
            (
                "POST",
                "/v1/agents/agent_01/archive",
                Agents,
                Archive,
                &["agent_01"],
            ),
            (
                "GET",
                "/v1/agents/agent_01/versions",
                AgentVersions,
                List,
                &["agent_01"],
            ),
            ("POST", "/v1/sessions?beta=true", Sessions, Create, &[]),
            (
                "GET",
                "/v1/sessions?statuses[]=idle&order=desc",
                Sessions,
                List,
                &[],
            ),
            ("GET", "/v1/sessions/sesn_1", Sessions, Read, &["sesn_1"]),
            ("POST", "/v1/sessions/sesn_1", Sessions, Update, &["sesn_1"]),
            (
                "DELETE",
                "/v1/sessions/sesn_1",
                Sessions,
                Delete,
                &["sesn_1"],
            ),
            (
                "POST",
                "/v1/sessions/sesn_1/archive",
                Sessions,
                Archive,
                &["sesn_1"],
            ),
            (
                "POST",
                "/v1/sessions/sesn_1/events",
                SessionEvents,
                SendEvents,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/events?types[]=agent.message",
                SessionEvents,
                List,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/events/stream",
                SessionEvents,
                Stream,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/stream",
                SessionEvents,
                Stream,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/threads",
                SessionThreads,
                List,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/threads/sthr_2",
                SessionThreads,
                Read,
                &["sesn_1", "sthr_2"],
            ),
            (
                "POST",
                "/v1/sessions/sesn_1/threads/sthr_2/archive",
                SessionThreads,
                Archive,
                &["sesn_1", "sthr_2"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/threads/sthr_2/events",
                SessionThreads,
                List,
                &["sesn_1", "sthr_2"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/threads/sthr_2/stream",
                SessionThreads,
                Stream,
                &["sesn_1", "sthr_2"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/resources",
                SessionResources,
                List,
                &["sesn_1"],
            ),
            (
                "POST",
                "/v1/sessions/sesn_1/resources",
                SessionResources,
                Create,
                &["sesn_1"],
            ),
            (
                "GET",
                "/v1/sessions/sesn_1/resources/sres_9",
                SessionResources,
                Read,
                &["sesn_1", "sres_9"],
            ),
            (
                "POST",
                "/v1/sessions/sesn_1/resources/sres_9",
                SessionResources,
                Update,
                &["sesn_1", "sres_9"],
            ),
            (
                "DELETE",
                "/v1/sessions/sesn_1/resources/sres_9",
                SessionResources,
                Delete,
                &["sesn_1", "sres_9"],
            ),
            ("POST", "/v1/environments", Environments, Create, &[]),
            ("GET", "/v1/environments", Environments, List, &[]),
            (
                "GET",
                "/v1/environments/env_1",
                Environments,
                Read,
                &["env_1"],
            ),
            (
                "POST",
                "/v1/environments/env_1",
                Environments,
                Update,
                &["env_1"],
            ),
            (
                "DELETE",
                "/v1/environments/env_1",
                Environments,
                Delete,
                &["env_1"],
            ),
            (
                "POST",
                "/v1/environments/env_1/archive",
                Environments,
                Archive,
                &["env_1"],
            ),
            (
                "GET",
                "/v1/environments/env_1/work",
                EnvironmentWork,
                List,
                &["env_1"],
            ),
            (
                "GET",
                "/v1/environments/env_1/work/wrk_7",
                EnvironmentWork,
                Read,
                &["env_1", "wrk_7"],
            ),
            (
                "POST",
                "/v1/environments/env_1/work/wrk_7/ack",
                EnvironmentWork,
                Update,
                &["env_1", "wrk_7"],
            ),
            ("POST", "/v1/vaults", Vaults, Create, &[]),
            ("GET", "/v1/vaults", Vaults, List, &[]),
            ("GET", "/v1/vaults/vlt_1", Vaults, Read, &["vlt_1"]),
            ("POST", "/v1/vaults/vlt_1", Vaults, Update, &["vlt_1"]),
            ("DELETE", "/v1/vaults/vlt_1", Vaults, Delete, &["vlt_1"]),
            (
                "POST",
                "/v1/vaults/vlt_1/archive",
                Vaults,
                Archive,
                &["vlt_1"],
            ),
            (
                "POST",
                "/v1/vaults/vlt_1/credentials",
                VaultCredentials,
                Create,
                &["vlt_1"],
            ),
            (
                "GET",
                "/v1/vaults/vlt_1/credentials",
                VaultCredentials,
                List,
                &["vlt_1"],
            ),
            (
                "GET",
                "/v1/vaults/vlt_1/credentials/vcrd_2",
                VaultCredentials,
                Read,
                &["vlt_1", "vcrd_2"],
            ),
            (
                "POST",
                "/v1/vaults/vlt_1/credentials/vcrd_2",
                VaultCredentials,
                Update,
                &["vlt_1", "vcrd_2"],
            ),
            (
                "DELETE",
                "/v1/vaults/vlt_1/credentials/vcrd_2",
                VaultCredentials,
                Delete,
                &["vlt_1", "vcrd_2"],
            ),
            (
                "POST",
                "/v1/vaults/vlt_1/credentials/vcrd_2/archive",
                VaultCredentials,
                Archive,
                &["vlt_1", "vcrd_2"],
            ),
            ("GET", "/v1/files?scope_id=sesn_1", Files, List, &[]),
            ("GET", "/v1/files/file_1/content", Files, Read, &["file_1"]),
            ("DELETE", "/v1/files/file_1", Files, Delete, &["file_1"]),
            (
                "GET",
                "/v1/skills/skill_1/versions/1759178010641129",
                Skills,
                Read,
                &["skill_1", "1759178010641129"],
            ),
            (
                "POST",
                "/v1/memory_stores/memstore_1/archive",
                MemoryStores,
                Archive,
                &["memstore_1"],
            ),
            (
                "GET",
                "/v1/deployments/depl_1",
                Deployments,
                Read,
                &["depl_1"],
            ),
            (
                "GET",
                "/v1/deployment_runs/drun_1",
                DeploymentRuns,
                Read,
                &["drun_1"],
            ),
            ("GET", "/v1/environments/env_1/work/poll?block_ms=999&reclaim_older_than_ms=5000", EnvironmentWork, Poll, &["env_1"]),
            ("GET", "/v1/environments/env_1/work/stats", EnvironmentWork, Read, &["env_1"]),
            ("POST", "/v1/environments/env_1/work/work_7", EnvironmentWork, Update, &["env_1", "work_7"]),
            ("POST", "/v1/environments/env_1/work/work_7/heartbeat?desired_ttl_seconds=30&expected_last_heartbeat=NO_HEARTBEAT", EnvironmentWork, Update, &["env_1", "work_7"]),
            ("POST", "/v1/environments/env_1/work/work_7/stop", EnvironmentWork, Update, &["env_1", "work_7"]),
            ("POST", "/v1/vaults/vlt_1/credentials/vcrd_2/mcp_oauth_validate", VaultCredentials, Validate, &["vlt_1", "vcrd_2"]),
            ("POST", "/v1/deployments/depl_1/pause", Deployments, Update, &["depl_1"]),
            ("POST", "/v1/deployments/depl_1/unpause", Deployments, Update, &["depl_1"]),
            ("POST", "/v1/deployments/depl_1/run", Deployments, Run, &["depl_1"]),
            ("GET", "/v1/deployment_runs?deployment_id=depl_1&has_error=true", DeploymentRuns, List, &[]),
            ("POST", "/v1/memory_stores/memstore_1/memories", Memories, Create, &["memstore_1"]),
            ("GET", "/v1/memory_stores/memstore_1/memories?path_prefix=/a&depth=2", Memories, List, &["memstore_1"]),
            ("GET", "/v1/memory_stores/memstore_1/memories/mem_2?view=full", Memories, Read, &["memstore_1", "mem_2"]),
            ("POST", "/v1/memory_stores/memstore_1/memories/mem_2", Memories, Update, &["memstore_1", "mem_2"]),
            ("DELETE", "/v1/memory_stores/memstore_1/memories/mem_2?expected_content_sha256=ab", Memories, Delete, &["memstore_1", "mem_2"]),
            ("GET", "/v1/memory_stores/memstore_1/memory_versions", MemoryVersions, List, &["memstore_1"]),
            ("GET", "/v1/memory_stores/memstore_1/memory_versions/memver_3", MemoryVersions, Read, &["memstore_1", "memver_3"]),
            ("POST", "/v1/memory_stores/memstore_1/memory_versions/memver_3/redact", MemoryVersions, Delete, &["memstore_1", "memver_3"]),
            ("POST", "/v1/dreams", Dreams, Create, &[]),
            ("GET", "/v1/dreams?statuses[]=running", Dreams, List, &[]),
            ("GET", "/v1/dreams/drm_1", Dreams, Read, &["drm_1"]),
            ("POST", "/v1/dreams/drm_1/cancel", Dreams, Update, &["drm_1"]),
            ("POST", "/v1/dreams/drm_1/archive", Dreams, Archive, &["drm_1"]),
            ("POST", "/v1/tunnels", Tunnels, Create, &[]),
            ("GET", "/v1/tunnels", Tunnels, List, &[]),
            ("GET", "/v1/tunnels/tnl_1", Tunnels, Read, &["tnl_1"]),
            ("POST", "/v1/tunnels/tnl_1/archive", Tunnels, Archive, &["tnl_1"]),
            ("POST", "/v1/tunnels/tnl_1/reveal_token", Tunnels, Reveal, &["tnl_1"]),
            ("POST", "/v1/tunnels/tnl_1/rotate_token", Tunnels, Reveal, &["tnl_1"]),
            ("POST", "/v1/tunnels/tnl_1/certificates", TunnelCertificates, Create, &["tnl_1"]),
            ("GET", "/v1/tunnels/tnl_1/certificates", TunnelCertificates, List, &["tnl_1"]),
            ("GET", "/v1/tunnels/tnl_1/certificates/tcrt_2", TunnelCertificates, Read, &["tnl_1", "tcrt_2"]),
            ("POST", "/v1/tunnels/tnl_1/certificates/tcrt_2/archive", TunnelCertificates, Archive, &["tnl_1", "tcrt_2"]),
            ("POST", "/v1/user_profiles", UserProfiles, Create, &[]),
            ("GET", "/v1/user_profiles", UserProfiles, List, &[]),
            ("GET", "/v1/user_profiles/uprof_1", UserProfiles, Read, &["uprof_1"]),
            ("POST", "/v1/user_profiles/uprof_1", UserProfiles, Update, &["uprof_1"]),
            ("DELETE", "/v1/user_profiles/uprof_1", UserProfiles, Delete, &["uprof_1"]),
            ("POST", "/v1/user_profiles/uprof_1/action_urls", UserProfiles, Reveal, &["uprof_1"]),
            ("POST", "/v1/user_profiles/uprof_1/enrollment_url", UserProfiles, Reveal, &["uprof_1"]),
            ("GET", "/v1/user_profiles/uprof_1/providers/google/data_controls", UserProfiles, Read, &["uprof_1"]),
            ("POST", "/v1/user_profiles/uprof_1/providers/google/data_controls", UserProfiles, Update, &["uprof_1"]),
        ];
        for (method, path, family, action, ids) in table {
            assert_eq!(
                check(method, path),
                Some((*family, *action, ids.to_vec())),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn crafted_and_unknown_paths_are_refused() {
        let refused = [
            ("GET", "/"),
            ("GET", "/v1"),
            ("GET", "/v1/"),
            ("GET", "/v1/messages"),
            ("POST", "/v1/complete"),
            ("GET", "/_emulator/usage/sesn_1"),
            ("GET", "/v1/sessions/"),
            ("GET", "//v1/sessions"),
            ("GET", "/v1//sessions"),
            ("GET", "/v1/sessions//sesn_1"),
            ("GET", "/V1/sessions"),
            ("GET", "/v1/Sessions"),
            ("GET", "/v1/SESSIONS/sesn_1"),
            ("GET", "/v1/sessions/sesn_1/"),
            ("GET", "/v1/sessions/../agents"),
            ("GET", "/v1/sessions/./sesn_1"),
            ("GET", "/v1/sessions/sesn_1/../../messages"),
            ("GET", "/v1/sessions/sesn_1%2Fevents"),
            ("GET", "/v1/sessions/sesn_1%2fevents/stream"),
            ("GET", "/v1/sessions/%73esn_1"),
            ("GET", "/v1/sessions/sesn_1;x=y"),
            ("GET", "/v1/sessions/sesn_1\\events"),
            ("GET", "/v1/sessions/sesn_1#frag"),
            ("GET", "/v1/sessions/agent_1"),
            ("GET", "/v1/sessions/sesn_"),
            ("GET", "/v1/sessions/sesn_a.b"),
            ("GET", "/v1/agents/agent_1/delete"),
            ("DELETE", "/v1/agents/agent_1"),
            ("PUT", "/v1/agents"),
            ("PATCH", "/v1/agents/agent_1"),
            ("HEAD", "/v1/agents"),
            ("OPTIONS", "/v1/agents"),
            ("get", "/v1/agents"),
            ("DELETE", "/v1/sessions"),
            ("GET", "/v1/environments/env_1/work/w1/ACK"),
            ("GET", "/v1/environments/env_1/work/w1/a/b"),
            ("POST", "/v1/environments/env_1/work"),
            ("DELETE", "/v1/environments/env_1/work/w1"),
            ("POST", "/v1/environments/env_1/work/w1/frobnicate"),
            ("GET", "/v1/environments/env_1/work/w1/ack"),
            ("POST", "/v1/environments/env_1/work/poll"),
            ("POST", "/v1/deployment_runs"),
            ("POST", "/v1/deployments/depl_1/resume"),
            ("GET", "/v1/tunnels/tnl_1/reveal_token"),
            ("DELETE", "/v1/tunnels/tnl_1"),
            ("GET", "/v1/tunnels/agent_1"),
            (
                "POST",
                "/v1/user_profiles/uprof_1/providers/github/data_controls",
            ),
            ("GET", "/v1/memory_stores/memstore_1/memory_versions/mem_1"),
            ("GET", "/v1/dreams/drm_1/cancel"),
            ("GET", "/v1/organizations/webhooks"),
            ("POST", "/v1/organizations/tunnels"),
        ];
        for (method, path) in refused {
            assert_eq!(check(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn oversized_ids_and_paths_are_refused() {
        let rules = RouteRules::default();
        let long_id = format!("sesn_{}", "a".repeat(rules.max_id_bytes));
        assert_eq!(
            classify(&rules, "GET", &format!("/v1/sessions/{long_id}")),
            None
        );
        let ok_id = format!("sesn_{}", "a".repeat(rules.max_id_bytes - 5));
        assert!(classify(&rules, "GET", &format!("/v1/sessions/{ok_id}")).is_some());
        let long_path = format!("/v1/agents?{}", "q".repeat(10_000));
        // The query string does not count against the path limit: it is forwarded untouched.
        assert!(classify(&rules, "GET", &long_path).is_some());
        let rules = RouteRules {
            max_path_bytes: 20,
            ..RouteRules::default()
        };
        assert_eq!(classify(&rules, "GET", "/v1/agents/agent_0123456789"), None);
    }

    #[test]
    fn neighbours_are_routed_only_when_enabled() {
        let none = RouteRules::default();
        for path in [
            "/v1/files",
            "/v1/skills",
            "/v1/memory_stores",
            "/v1/deployments",
            "/v1/deployment_runs",
            "/v1/dreams",
            "/v1/tunnels",
            "/v1/user_profiles",
        ] {
            assert_eq!(classify(&none, "GET", path), None, "{path}");
            assert!(classify(&all_neighbours(), "GET", path).is_some(), "{path}");
        }
        let files_only = RouteRules {
            neighbours: vec![Neighbour::Files],
            ..RouteRules::default()
        };
        assert!(classify(&files_only, "GET", "/v1/files").is_some());
        assert_eq!(classify(&files_only, "GET", "/v1/skills"), None);
    }

    #[test]
    fn id_lookup_by_kind() {
        let op = classify(
            &RouteRules::default(),
            "GET",
            "/v1/vaults/vlt_1/credentials/vcrd_2",
        )
        .unwrap();
        assert_eq!(op.id(IdKind::Vault), Some("vlt_1"));
        assert_eq!(op.id(IdKind::Credential), Some("vcrd_2"));
        assert_eq!(op.id(IdKind::Session), None);
        assert!(!op.is_stream());
    }
}
