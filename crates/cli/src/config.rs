//! Settings from a TOML file: `lego --config FILE COMMAND ...` (or
//! `LEGO_CONFIG=FILE`). Each command reads its own table, keyed by its
//! long flag names:
//!
//! ```toml
//! [memory]
//! listen = "10.0.0.2:7100"
//! capacity = "8G"
//! manager = "10.0.0.1:7000"
//!
//! [manager]
//! listen = "10.0.0.1:7000"
//! state = "/var/lib/lego"
//! heartbeat-timeout = "3s"
//! ```
//!
//! Precedence: a flag on the command line, then the flag's environment
//! variable (`--help` names it), then the file, then the default. One
//! mechanism does it: a setting of the file becomes the flag's environment
//! variable unless that is already set, before the command line is parsed.
//! A key that is not a flag of the command with an environment variable is
//! an error naming it.

use clap::CommandFactory;

/// Applies the file's settings for the command about to run. Returns an
/// error message for a file that cannot be read or holds a setting the
/// command does not have.
pub fn apply<C: CommandFactory>(args: &[String]) -> Result<(), String> {
    let (path, command) = locate(args);
    let Some(path) = path.or_else(|| std::env::var("LEGO_CONFIG").ok()) else {
        return Ok(());
    };
    let Some(command) = command else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("config file {path}: {e}"))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {path}: {}", e.message()))?;
    for (section, value) in &table {
        if !value.is_table() {
            return Err(format!(
                "config file {path}: '{section}' must be a table ([{section}])"
            ));
        }
    }
    let Some(settings) = table.get(&command).and_then(|v| v.as_table()) else {
        return Ok(());
    };
    let cli = C::command();
    let Some(sub) = cli.find_subcommand(&command) else {
        return Ok(());
    };
    for (key, value) in settings {
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .ok_or_else(|| format!("config file {path}: [{command}] has no setting '{key}'"))?;
        let env = arg.get_env().ok_or_else(|| {
            format!("config file {path}: [{command}] '{key}' can only be given on the command line")
        })?;
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "config file {path}: [{command}] '{key}' must be a string, number or boolean, not {}",
                    other.type_str()
                ))
            }
        };
        if std::env::var_os(env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

/// The value of `--config` and the subcommand, from the raw arguments
/// (before clap sees them); `--config` is removed by clap's own parse.
fn locate(args: &[String]) -> (Option<String>, Option<String>) {
    let (mut path, mut command) = (None, None);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break; // The program's own arguments follow.
        } else if a == "--config" {
            path = it.next().cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        } else if command.is_none() && !a.starts_with('-') {
            command = Some(a.clone());
        }
    }
    (path, command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_and_the_file_are_found_before_parsing() {
        let args: Vec<String> = ["lego", "--config", "f.toml", "memory", "--listen", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            locate(&args),
            (Some("f.toml".into()), Some("memory".into()))
        );
        let args: Vec<String> = ["lego", "status"].iter().map(|s| s.to_string()).collect();
        assert_eq!(locate(&args), (None, Some("status".into())));
        let args: Vec<String> = ["lego", "run", "--config=c", "--", "prog", "--config", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(locate(&args), (Some("c".into()), Some("run".into())));
    }
}
