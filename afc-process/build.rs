//! Stamps the build with its commit (`AFC_GIT_COMMIT`, for `afc_build_info`): `git rev-parse
//! --short HEAD`, or "unknown" outside a git checkout (a source tarball) or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=AFC_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves (a commit, a checkout); only paths that exist, or cargo would rerun
    // this on every build.
    for p in ["HEAD", "refs/heads"] {
        if let Some(path) = git(&["rev-parse", "--git-path", p]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
