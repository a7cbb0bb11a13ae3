//! Every setting as a flag of `packenvd run` and `check-config`, generated from [`KEYS`].

use std::collections::BTreeMap;

use super::KEYS;

/// The settings as flags (`--concurrency 4`), one per declared key, with the declaration's
/// help. Implemented by hand because the flags come from [`KEYS`], not from a struct.
#[derive(Debug, Clone, Default)]
pub struct SettingFlags(pub BTreeMap<&'static str, String>);

impl clap::FromArgMatches for SettingFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = SettingFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for k in KEYS {
            if let Some(v) = m.get_one::<String>(k.name) {
                self.0.insert(k.name, v.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        KEYS.iter().fold(cmd, |cmd, k| {
            let mut help = k.help_text();
            if k.name == "database_url" {
                help.push_str(" A flag is visible to every local user in `ps`: prefer DATABASE_URL or the config file.");
            }
            cmd.arg(
                clap::Arg::new(k.name)
                    .long(k.flag())
                    .value_name("VALUE")
                    .help(help)
                    .help_heading("Settings (override the config file and the environment)"),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}
