//! `lego keygen` and the `--key` flag every command takes: which
//! credential proves who this command is (docs/security.md).

use std::path::PathBuf;
use std::process::ExitCode;

use lego_transport::auth::{Credential, Identity};

use crate::fail;

#[derive(clap::Args, Clone, Debug)]
pub struct KeyArg {
    /// Credential file (made by `lego keygen`). Default: the file LEGO_KEY
    /// names, else ~/.lego/cluster.key (which a daemon on a loopback
    /// address makes if there is none).
    #[arg(long = "key", value_name = "FILE", env = "LEGO_KEY")]
    pub key: Option<PathBuf>,
}

impl KeyArg {
    /// The credential a client command proves itself with.
    pub fn client(&self) -> Result<Credential, String> {
        Credential::for_client(self.key.as_deref())
    }

    /// The cluster credential a daemon listening on `listen` serves with.
    pub fn daemon(&self, listen: &str) -> Result<Credential, String> {
        Credential::for_daemon(self.key.as_deref(), listen)
    }
}

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Write the credential to FILE, readable by its owner only (an
    /// existing file is never overwritten), instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Make user NAME's credential instead of a new cluster's: on processor
    /// daemons its programs run as the local user NAME, and it cannot
    /// reconfigure the cluster. Derived from the cluster credential that
    /// --from names.
    #[arg(long, value_name = "NAME", requires = "from")]
    user: Option<String>,
    /// The cluster credential a user's is derived from.
    #[arg(long, value_name = "FILE", requires = "user")]
    from: Option<PathBuf>,
}

/// `lego keygen`: a new cluster credential, or a user's derived from one.
pub fn keygen(args: KeygenArgs) -> ExitCode {
    let made = match (&args.user, &args.from) {
        (Some(name), Some(from)) => Identity::parse(&format!("user:{name}"))
            .and_then(|id| Credential::load(from).and_then(|cluster| cluster.derive(id))),
        _ => Credential::generate().map_err(|e| format!("no random numbers: {e}")),
    };
    let cred = match made {
        Ok(c) => c,
        Err(e) => return fail("lego keygen", e),
    };
    match &args.out {
        Some(path) => match cred.save(path) {
            Ok(()) => {
                eprintln!(
                    "lego keygen: wrote the credential of {} to {}",
                    cred.identity(),
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail("lego keygen", format!("{}: {e}", path.display())),
        },
        None => {
            print!("{}", cred.to_text());
            ExitCode::SUCCESS
        }
    }
}

/// The credential of one `lego run` with an embedded memory daemon: made
/// for the run, kept in a private directory for the program's runtime (and
/// the programs it starts) to read, removed when the run ends. No set-up,
/// and nothing else can talk to that daemon.
pub struct OneRunKey {
    pub cred: Credential,
    dir: PathBuf,
}

impl OneRunKey {
    pub fn new() -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        let cred = Credential::generate().map_err(|e| format!("no random numbers: {e}"))?;
        let mut tag = [0u8; 8];
        getrandom::getrandom(&mut tag).map_err(|e| format!("no random numbers: {e}"))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("lego-run-{}-{tag}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let key = Self { cred, dir };
        key.cred
            .save(&key.path())
            .map_err(|e| format!("cannot write {}: {e}", key.path().display()))?;
        Ok(key)
    }

    /// The credential file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("key")
    }
}

impl Drop for OneRunKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
