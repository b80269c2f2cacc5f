//! QEMU's `-object` syntax for guest memory backends.
//!
//! ```text
//! memory-backend-guest-memfd,id=ID,size=SIZE[,prealloc=on|off][,host-nodes=NODES]
//!     [,policy=default|preferred|bind|interleave][,mmap=on|off][,init-shared=on|off]
//!     [,hugetlb=on|off][,hugetlbsize=SIZE]
//! memory-backend-memfd,id=ID,size=SIZE,share=on,guest-memfd=on[, the same options]
//! ```
//!
//! As in QEMU: properties are `key=value` separated by commas, a literal comma inside a value
//! is written `,,`, sizes take the suffixes `K M G T` (powers of 1024, optionally with a
//! decimal fraction, e.g. `1.5G`), booleans are `on|off|yes|no|true|false`, `host-nodes` is a
//! node or a range `A-B` and may be repeated to add more. Unknown types and properties,
//! repeated scalar properties and invalid values are errors that name the property.

use std::fmt;

/// The NUMA policy named by `policy=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// The process's default policy.
    #[default]
    Default,
    /// Prefer `host-nodes`, fall back elsewhere.
    Preferred,
    /// Only `host-nodes`.
    Bind,
    /// Interleave over `host-nodes`.
    Interleave,
}

/// Where the pages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// memfd with 4 KiB pages.
    Shmem,
    /// HugeTLB memfd with pages of the given size.
    HugeTlb(u64),
}

/// A parsed guest memory backend object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryObject {
    /// `id=`.
    pub id: String,
    /// `size=` in bytes.
    pub size: u64,
    /// `prealloc=`.
    pub prealloc: bool,
    /// `host-nodes=`, sorted and without duplicates.
    pub host_nodes: Vec<u32>,
    /// `policy=`.
    pub policy: PolicyKind,
    /// `mmap=` (default on): the host may map the memory.
    pub mmap: bool,
    /// `init-shared=` (default off): every page starts shared.
    pub init_shared: bool,
    /// `hugetlb=` / `hugetlbsize=`.
    pub source: Source,
}

/// Why an object string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The string is empty or has no type.
    #[error("missing object type")]
    MissingType,
    /// The type is not a guest memory backend gmem serves.
    #[error(
        "unknown object type '{0}' (expected memory-backend-guest-memfd or memory-backend-memfd)"
    )]
    UnknownType(String),
    /// A `key=value` pair had no `=` or an empty key.
    #[error("malformed property '{0}' (expected key=value)")]
    Malformed(String),
    /// A property the type does not have.
    #[error("property '{prop}' not found for type '{ty}'")]
    UnknownProperty {
        /// The object type.
        ty: String,
        /// The property.
        prop: String,
    },
    /// A scalar property given twice.
    #[error("property '{0}' given more than once")]
    Duplicate(String),
    /// A required property is missing.
    #[error("property '{0}' is required")]
    Missing(&'static str),
    /// A value that does not parse or is not allowed.
    #[error("invalid value '{value}' for property '{prop}': {reason}")]
    Invalid {
        /// The property.
        prop: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl ObjectError {
    /// The errno a VMM would report for this error (`EINVAL` for every case).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Splits on single commas; `,,` is a literal comma.
fn split(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

fn invalid(prop: &str, value: &str, reason: &'static str) -> ObjectError {
    ObjectError::Invalid {
        prop: prop.to_string(),
        value: value.to_string(),
        reason,
    }
}

/// Parses a size with QEMU's suffixes (`K M G T`, powers of 1024, optional fraction).
pub fn parse_size(prop: &str, v: &str) -> Result<u64, ObjectError> {
    let bad = |r| invalid(prop, v, r);
    let t = v.trim();
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad("unknown size suffix")),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad("not a size"));
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.contains('.') {
        return Err(bad("not a size"));
    }
    let whole: u64 = int.parse().map_err(|_| bad("too large"))?;
    let mut total = whole.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    if !frac.is_empty() {
        if frac.len() > 9 {
            return Err(bad("too many decimals"));
        }
        let f: u64 = frac.parse().map_err(|_| bad("not a size"))?;
        let scale = 10u64.pow(u32::try_from(frac.len()).unwrap_or(9));
        let part = u128::from(f) * u128::from(mult) / u128::from(scale);
        if u128::from(f) * u128::from(mult) % u128::from(scale) != 0 {
            return Err(bad("fraction is not a whole number of bytes"));
        }
        total = total
            .checked_add(u64::try_from(part).map_err(|_| bad("too large"))?)
            .ok_or_else(|| bad("too large"))?;
    }
    Ok(total)
}

fn parse_bool(prop: &str, v: &str) -> Result<bool, ObjectError> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(invalid(prop, v, "expected on or off")),
    }
}

fn parse_nodes(v: &str, into: &mut Vec<u32>) -> Result<(), ObjectError> {
    let bad = |r| invalid("host-nodes", v, r);
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad("not a node number"));
    let (a, b) = match v.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(v)?, num(v)?),
    };
    if a > b {
        return Err(bad("range is reversed"));
    }
    if b >= 1024 {
        return Err(bad("node number too large (max 1023)"));
    }
    into.extend(a..=b);
    Ok(())
}

/// The properties of one `-object` value as they are read, before the checks across them.
struct Props {
    id: Option<String>,
    size: Option<u64>,
    prealloc: bool,
    policy: PolicyKind,
    mmap: bool,
    init_shared: bool,
    hugetlb: bool,
    hugesize: Option<u64>,
    share: Option<bool>,
    guest_memfd: Option<bool>,
    nodes: Vec<u32>,
}

impl Props {
    /// Every property at its default.
    fn new() -> Self {
        Props {
            id: None,
            size: None,
            prealloc: false,
            policy: PolicyKind::Default,
            mmap: true,
            init_shared: false,
            hugetlb: false,
            hugesize: None,
            share: None,
            guest_memfd: None,
            nodes: Vec::new(),
        }
    }

    /// Sets property `k` to `v` for an object of type `ty` (`memfd` when it is
    /// `memory-backend-memfd`, which takes three more properties).
    fn set(&mut self, ty: &str, memfd: bool, k: &str, v: &str) -> Result<(), ObjectError> {
        match k {
            "id" => self.id = Some(parse_id(k, v)?),
            "size" => self.size = Some(parse_size(k, v)?),
            "prealloc" => self.prealloc = parse_bool(k, v)?,
            "host-nodes" => parse_nodes(v, &mut self.nodes)?,
            "policy" => self.policy = parse_policy(k, v)?,
            "mmap" => self.mmap = parse_bool(k, v)?,
            "init-shared" => self.init_shared = parse_bool(k, v)?,
            "hugetlb" => self.hugetlb = parse_bool(k, v)?,
            "hugetlbsize" => self.hugesize = Some(parse_hugesize(k, v)?),
            "share" if memfd => self.share = Some(parse_bool(k, v)?),
            "guest-memfd" if memfd => self.guest_memfd = Some(parse_bool(k, v)?),
            "seal" if memfd => {
                parse_bool(k, v)?;
            }
            _ => {
                return Err(ObjectError::UnknownProperty {
                    ty: ty.to_string(),
                    prop: k.to_string(),
                })
            }
        }
        Ok(())
    }
}

/// An `id`: letters, digits, `-`, `_` and `.`, at least one.
fn parse_id(k: &str, v: &str) -> Result<String, ObjectError> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(k, v, "ids are letters, digits, '-', '_' and '.'"));
    }
    Ok(v.to_string())
}

/// A `policy`: `default`, `preferred`, `bind` or `interleave`.
fn parse_policy(k: &str, v: &str) -> Result<PolicyKind, ObjectError> {
    match v {
        "default" => Ok(PolicyKind::Default),
        "preferred" => Ok(PolicyKind::Preferred),
        "bind" => Ok(PolicyKind::Bind),
        "interleave" => Ok(PolicyKind::Interleave),
        _ => Err(invalid(
            k,
            v,
            "expected default, preferred, bind or interleave",
        )),
    }
}

/// A `hugetlbsize`: 2M or 1G.
fn parse_hugesize(k: &str, v: &str) -> Result<u64, ObjectError> {
    let sz = parse_size(k, v)?;
    if sz != 2 << 20 && sz != 1 << 30 {
        return Err(invalid(k, v, "expected 2M or 1G"));
    }
    Ok(sz)
}

/// The object type: false for `memory-backend-guest-memfd`, true for `memory-backend-memfd`.
fn parse_type(ty: &str) -> Result<bool, ObjectError> {
    if ty.is_empty() || ty.contains('=') {
        return Err(ObjectError::MissingType);
    }
    match ty {
        "memory-backend-guest-memfd" => Ok(false),
        "memory-backend-memfd" => Ok(true),
        other => Err(ObjectError::UnknownType(other.to_string())),
    }
}

/// Parses one `-object` value.
pub fn parse(s: &str) -> Result<MemoryObject, ObjectError> {
    let parts = split(s);
    let ty = parts.first().map(String::as_str).unwrap_or("");
    let memfd = parse_type(ty)?;
    let mut seen: Vec<String> = Vec::new();
    let mut props = Props::new();
    for kv in &parts[1..] {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ObjectError::Malformed(kv.clone()))?;
        if k != "host-nodes" {
            if seen.iter().any(|s| s == k) {
                return Err(ObjectError::Duplicate(k.to_string()));
            }
            seen.push(k.to_string());
        }
        props.set(ty, memfd, k, v)?;
    }
    let id = props.id.ok_or(ObjectError::Missing("id"))?;
    let size = props.size.ok_or(ObjectError::Missing("size"))?;
    if memfd {
        check_memfd(props.share, props.guest_memfd)?;
    }
    let source = source(props.hugetlb, props.hugesize)?;
    check_size(size, source)?;
    let mut nodes = props.nodes;
    nodes.sort_unstable();
    nodes.dedup();
    check_policy(props.policy, &nodes)?;
    Ok(MemoryObject {
        id,
        size,
        prealloc: props.prealloc,
        host_nodes: nodes,
        policy: props.policy,
        mmap: props.mmap,
        init_shared: props.init_shared,
        source,
    })
}

/// `memory-backend-memfd` is served only with `share=on` and `guest-memfd=on`.
fn check_memfd(share: Option<bool>, guest_memfd: Option<bool>) -> Result<(), ObjectError> {
    if share != Some(true) {
        return Err(ObjectError::Invalid {
            prop: "share".into(),
            value: share.map_or("(unset)", |_| "off").into(),
            reason: "guest memory must be share=on",
        });
    }
    if guest_memfd != Some(true) {
        return Err(ObjectError::Invalid {
            prop: "guest-memfd".into(),
            value: guest_memfd.map_or("(unset)", |_| "off").into(),
            reason: "gmem serves memory-backend-memfd only with guest-memfd=on",
        });
    }
    Ok(())
}

/// The source of the memory: HugeTLB pages of `hugesize` (2 MiB unless given) with
/// `hugetlb=on`, shmem otherwise (and then no `hugetlbsize`).
fn source(hugetlb: bool, hugesize: Option<u64>) -> Result<Source, ObjectError> {
    if hugesize.is_some() && !hugetlb {
        return Err(invalid("hugetlbsize", "", "needs hugetlb=on"));
    }
    Ok(if hugetlb {
        Source::HugeTlb(hugesize.unwrap_or(2 << 20))
    } else {
        Source::Shmem
    })
}

/// The size must be a non-zero multiple of the page size of `source`.
fn check_size(size: u64, source: Source) -> Result<(), ObjectError> {
    let align = match source {
        Source::Shmem => 4096,
        Source::HugeTlb(s) => s,
    };
    if size == 0 || size % align != 0 {
        return Err(ObjectError::Invalid {
            prop: "size".into(),
            value: size.to_string(),
            reason: "must be a non-zero multiple of the page size",
        });
    }
    Ok(())
}

/// `policy=default` takes no host nodes; every other policy needs some.
fn check_policy(policy: PolicyKind, nodes: &[u32]) -> Result<(), ObjectError> {
    match (policy, nodes.is_empty()) {
        (PolicyKind::Default, false) => Err(invalid(
            "host-nodes",
            "",
            "policy=default takes no host-nodes",
        )),
        (PolicyKind::Bind | PolicyKind::Interleave | PolicyKind::Preferred, true) => {
            Err(invalid("policy", "", "this policy needs host-nodes"))
        }
        _ => Ok(()),
    }
}

impl fmt::Display for MemoryObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory-backend-guest-memfd,id={},size={},prealloc={},mmap={},init-shared={}",
            self.id.replace(',', ",,"),
            self.size,
            if self.prealloc { "on" } else { "off" },
            if self.mmap { "on" } else { "off" },
            if self.init_shared { "on" } else { "off" },
        )?;
        if let Source::HugeTlb(sz) = self.source {
            write!(f, ",hugetlb=on,hugetlbsize={sz}")?;
        }
        let policy = match self.policy {
            PolicyKind::Default => return Ok(()),
            PolicyKind::Preferred => "preferred",
            PolicyKind::Bind => "bind",
            PolicyKind::Interleave => "interleave",
        };
        for n in &self.host_nodes {
            write!(f, ",host-nodes={n}")?;
        }
        write!(f, ",policy={policy}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_memfd_object() {
        let o = parse(
            "memory-backend-guest-memfd,id=ram0,size=1G,prealloc=on,host-nodes=0,policy=bind",
        )
        .unwrap();
        assert_eq!(o.id, "ram0");
        assert_eq!(o.size, 1 << 30);
        assert!(o.prealloc);
        assert_eq!(o.host_nodes, vec![0]);
        assert_eq!(o.policy, PolicyKind::Bind);
        assert_eq!(o.source, Source::Shmem);
        assert_eq!(parse(&o.to_string()).unwrap(), o);
    }

    #[test]
    fn parses_memfd_object_with_hugetlb() {
        let o = parse(
            "memory-backend-memfd,id=m,size=4M,share=on,guest-memfd=on,hugetlb=on,hugetlbsize=2M",
        )
        .unwrap();
        assert_eq!(o.source, Source::HugeTlb(2 << 20));
        assert_eq!(parse(&o.to_string()).unwrap(), o);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("size", "4096").unwrap(), 4096);
        assert_eq!(parse_size("size", "1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("size", "2m").unwrap(), 2 << 20);
        assert!(parse_size("size", "17179869184T").is_err());
        assert!(parse_size("size", "1.2.3M").is_err());
        assert!(parse_size("size", "x").is_err());
        assert!(parse_size("size", "").is_err());
    }

    #[test]
    fn errors_name_the_property() {
        assert_eq!(parse(""), Err(ObjectError::MissingType));
        assert_eq!(
            parse("memory-backend-file,id=a,size=4K"),
            Err(ObjectError::UnknownType("memory-backend-file".into()))
        );
        assert_eq!(
            parse("memory-backend-guest-memfd,id=a,size=4K,colour=red"),
            Err(ObjectError::UnknownProperty {
                ty: "memory-backend-guest-memfd".into(),
                prop: "colour".into()
            })
        );
        assert_eq!(
            parse("memory-backend-guest-memfd,size=4K"),
            Err(ObjectError::Missing("id"))
        );
        assert_eq!(
            parse("memory-backend-guest-memfd,id=a,id=b,size=4K"),
            Err(ObjectError::Duplicate("id".into()))
        );
        assert!(
            matches!(parse("memory-backend-guest-memfd,id=a,size=4097"), Err(ObjectError::Invalid { prop, .. }) if prop == "size")
        );
        assert!(
            matches!(parse("memory-backend-guest-memfd,id=a,size=4K,policy=odd"), Err(ObjectError::Invalid { prop, .. }) if prop == "policy")
        );
        assert!(
            matches!(parse("memory-backend-memfd,id=a,size=4K,share=off,guest-memfd=on"), Err(ObjectError::Invalid { prop, .. }) if prop == "share")
        );
        assert!(
            matches!(parse("memory-backend-memfd,id=a,size=4K,share=on"), Err(ObjectError::Invalid { prop, .. }) if prop == "guest-memfd")
        );
        assert!(
            matches!(parse("memory-backend-guest-memfd,id=a,size=4K,host-nodes=3-1,policy=bind"), Err(ObjectError::Invalid { prop, .. }) if prop == "host-nodes")
        );
        assert_eq!(
            parse("memory-backend-guest-memfd,id=a,size=4K,bogus"),
            Err(ObjectError::Malformed("bogus".into()))
        );
        assert!(
            matches!(parse("memory-backend-guest-memfd,id=a,,b,size=4K"), Err(ObjectError::Invalid { prop, .. }) if prop == "id")
        );
    }

    #[test]
    fn repeated_host_nodes_accumulate() {
        let o = parse(
            "memory-backend-guest-memfd,id=a,size=8K,host-nodes=0-1,host-nodes=3,policy=interleave",
        )
        .unwrap();
        assert_eq!(o.host_nodes, vec![0, 1, 3]);
    }
}
