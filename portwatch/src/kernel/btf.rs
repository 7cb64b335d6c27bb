//! Kernel struct offsets from /sys/kernel/btf/vmlinux.
//!
//! Rust eBPF has no CO-RE relocations, so the offsets the programs need (to read the network
//! namespace of a task or socket, and the protocol of a socket behind an fd) are resolved here
//! at load time and passed in as the `OFFSETS` global. They differ between kernels and
//! builds; nothing here hard-codes them.

use std::path::Path;

use btf_rs::{Btf, Type};
use portwatch_common::Offsets;

/// The number of parameters of each named kernel function that the BTF at `path` has (an
/// absent name is not in the map). Trampoline programs attach by name, and names and
/// signatures change between kernels: a function with another arity is not the one a
/// program was written for.
pub fn function_arity(
    path: &Path,
    names: &[&str],
) -> Result<std::collections::HashMap<String, usize>, String> {
    let btf = Btf::from_file(path).map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    let mut out = std::collections::HashMap::new();
    for name in names {
        let Ok(types) = btf.resolve_types_by_name(name) else {
            continue;
        };
        for t in types {
            if let Type::Func(f) = t {
                if let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&f) {
                    out.insert((*name).to_string(), proto.parameters.len());
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Why an offset path could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved(pub String);

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resolve every offset. A group (netns, sock) that fails is left disabled (`*_ok == 0`)
/// with the reason; the caller degrades instead of failing.
pub fn resolve(path: &Path) -> (Offsets, Vec<Unresolved>) {
    let mut o = Offsets::default();
    let mut problems = Vec::new();
    let btf = match Btf::from_file(path) {
        Ok(b) => b,
        Err(e) => {
            problems.push(Unresolved(format!("cannot parse {}: {e}", path.display())));
            return (o, problems);
        }
    };
    let r = Resolver { btf: &btf };

    // Each group is all or nothing: one unresolved member leaves the group disabled.
    let mut group = |paths: &[(&str, &[&str])]| -> Option<Vec<u32>> {
        let found = paths
            .iter()
            .map(|(name, path)| r.offset(name, path))
            .collect::<Result<Vec<u32>, Unresolved>>();
        found.map_err(|e| problems.push(e)).ok()
    };

    if let Some(v) = group(&[
        ("task_struct", &["nsproxy"]),
        ("nsproxy", &["net_ns"]),
        ("net", &["ns", "inum"]),
    ]) {
        o.task_nsproxy = v[0];
        o.nsproxy_net = v[1];
        o.net_inum = v[2];
        o.netns_ok = 1;
    }

    if let Some(v) = group(&[
        ("task_struct", &["files"]),
        ("files_struct", &["fdt"]),
        ("fdtable", &["max_fds"]),
        ("fdtable", &["fd"]),
        ("file", &["private_data"]),
        ("socket", &["sk"]),
        ("sock", &["sk_protocol"]),
        ("sock", &["__sk_common", "skc_net"]),
        ("sock", &["__sk_common", "skc_family"]),
        ("sock", &["__sk_common", "skc_num"]),
        ("sock", &["__sk_common", "skc_rcv_saddr"]),
        ("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
    ]) {
        o.task_files = v[0];
        o.files_fdt = v[1];
        o.fdt_max_fds = v[2];
        o.fdt_fd = v[3];
        o.file_private = v[4];
        o.socket_sk = v[5];
        o.sk_protocol = v[6];
        o.skc_net = v[7];
        o.skc_family = v[8];
        o.skc_num = v[9];
        o.skc_rcv_saddr = v[10];
        o.skc_v6_rcv_saddr = v[11];
        o.sock_ok = 1;
    }

    // The raw state-change tracepoint reads the remote end and the source port itself.
    if o.sock_ok == 1 {
        if let Some(v) = group(&[
            ("sock", &["__sk_common", "skc_daddr"]),
            ("sock", &["__sk_common", "skc_dport"]),
            ("sock", &["__sk_common", "skc_v6_daddr"]),
            ("inet_sock", &["inet_sport"]),
        ]) {
            o.skc_daddr = v[0];
            o.skc_dport = v[1];
            o.skc_v6_daddr = v[2];
            o.inet_sport = v[3];
            o.remote_ok = 1;
        }
    }
    (o, problems)
}

struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    /// Byte offset of `path` (nested member names) inside `struct name`.
    fn offset(&self, name: &str, path: &[&str]) -> Result<u32, Unresolved> {
        let what = || format!("{name}.{}", path.join("."));
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|e| Unresolved(format!("{}: {e}", what())))?;
        // Several types may share a name (a struct and a func, say): take the struct.
        let mut cur = types
            .into_iter()
            .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
            .ok_or_else(|| Unresolved(format!("{}: no struct {name} in BTF", what())))?;
        let mut bits = 0u32;
        for field in path {
            let (off, ty) = self
                .find_member(&cur, field)
                .ok_or_else(|| Unresolved(format!("{}: no member '{field}'", what())))?;
            bits += off;
            cur = ty;
        }
        if !bits.is_multiple_of(8) {
            return Err(Unresolved(format!("{}: is a bit field", what())));
        }
        Ok(bits / 8)
    }

    /// Find a member by name, descending into anonymous structs/unions. Returns its bit
    /// offset and its (typedef/qualifier-stripped) type.
    fn find_member(&self, t: &Type, field: &str) -> Option<(u32, Type)> {
        let members = match t {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => return None,
        };
        for m in members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.strip(self.btf.resolve_chained_type(m).ok()?);
            if name == field {
                return Some((m.bit_offset(), ty));
            }
            if name.is_empty() {
                if let Some((off, ty)) = self.find_member(&ty, field) {
                    return Some((m.bit_offset() + off, ty));
                }
            }
        }
        None
    }

    fn strip(&self, mut t: Type) -> Type {
        for _ in 0..16 {
            let next = match &t {
                Type::Typedef(x) => self.btf.resolve_chained_type(x).ok(),
                Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => {
                    self.btf.resolve_chained_type(x).ok()
                }
                Type::TypeTag(x) => self.btf.resolve_chained_type(x).ok(),
                _ => None,
            };
            match next {
                Some(n) => t = n,
                None => break,
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the running kernel's BTF; every Linux this agent supports has it.
    #[test]
    fn resolves_on_this_kernel() {
        let p = Path::new(crate::kernel::prereq::BTF_PATH);
        assert!(
            p.exists(),
            "{} missing: this kernel has no BTF",
            p.display()
        );
        let (o, problems) = resolve(p);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(o.netns_ok, 1);
        assert_eq!(o.sock_ok, 1);
        assert_eq!(o.remote_ok, 1);
        // skc_daddr is the first member of sock_common; the v6 addresses follow skc_net.
        assert_eq!(o.skc_daddr, 0);
        assert!(o.skc_v6_daddr > o.skc_net && o.skc_v6_rcv_saddr > o.skc_v6_daddr);
        // inet_sock starts with its struct sock, so inet_sport lies beyond sock_common.
        assert!(o.inet_sport > o.skc_v6_rcv_saddr);
        assert!(o.task_nsproxy > 0 && o.task_files > 0);
        // skc_family and skc_num sit in the first cache line of sock_common.
        assert!(o.skc_family < 64 && o.skc_num < 64);
    }
}
