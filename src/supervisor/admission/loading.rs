//! Options that change which code or configuration a command loads:
//! `manage.py`'s own `--settings` and `--pythonpath` (every command has
//! them), and the few options of default-allowed commands that import a
//! module or a directory the caller names. Given by the control plane, they
//! would run code of its choosing, so they are refused by default for every
//! command; `policy.allow_code_loading_options = true` allows them.
//!
//! The check reads the argument list as argparse would, and errs on the safe
//! side: a long option is refused when its name is an abbreviation of a
//! listed one (`--sett=x` is `--settings` to the command's parser), a short
//! one when its letter appears in a cluster (`-bt dir` is `-b -t dir`), and
//! tokens after `--` are looked at too.

use super::policy::ConfiguredIn;
use super::{Rejection, Rule};

/// Long options (without `--`) that load code or configuration, for every
/// command (`None`) or for one.
const LONG: &[(Option<&str>, &str)] = &[
    (None, "settings"),
    (None, "pythonpath"),
    // Compares with the settings of a module it imports.
    (Some("diffsettings"), "default"),
    // Imports the test runner class it names, and discovers tests from a directory.
    (Some("test"), "testrunner"),
    (Some("test"), "top-level-directory"),
];

/// Short options (the letter) that load code or configuration.
const SHORT: &[(&str, char)] = &[("test", 't')];

/// The first argument that names a code-loading option of `command`.
pub fn find(command: &str, args: &[String]) -> Option<String> {
    args.iter().find(|arg| loads_code(command, arg)).cloned()
}

fn loads_code(command: &str, arg: &str) -> bool {
    let applies = |only: Option<&str>| only.is_none_or(|name| name == command);
    if let Some(long) = arg.strip_prefix("--") {
        let name = long.split('=').next().unwrap_or_default();
        return !name.is_empty()
            && LONG.iter().any(|(only, option)| applies(*only) && option.starts_with(name));
    }
    let Some(cluster) = arg.strip_prefix('-') else {
        return false;
    };
    SHORT.iter().any(|(only, letter)| *only == command && cluster.contains(*letter))
}

/// The refusal of an execution given such an option; the hint names the
/// setting where the operator configures the policy.
pub fn rejection(arg: &str, configured_in: ConfiguredIn) -> Rejection {
    let how = match configured_in {
        ConfiguredIn::DcToml => "set allow_code_loading_options = true in [policy] of dc.toml",
        ConfiguredIn::DjangoSettings => {
            "set DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS = True in your Django settings"
        }
    };
    Rejection::new(
        Rule::CodeLoadingOption,
        format!("argument {arg:?} changes which code or settings the command loads"),
        format!(
            "The control plane may not choose the settings module, the Python path or other \
             code a command imports.\nTo allow it anyway, {how}.\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(command: &str, args: &[&str]) -> Option<String> {
        find(command, &args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn global_options_and_their_abbreviations_are_found_for_every_command() {
        for arg in
            ["--settings=x", "--settings", "--sett=x", "--s", "--pythonpath=/tmp", "--py", "--pythonp=/x"]
        {
            assert_eq!(found("migrate", &["--plan", arg]), Some(arg.to_string()), "{arg}");
        }
        assert_eq!(found("migrate", &["--", "--settings"]), Some("--settings".into()));
        for harmless in [&["--plan"][..], &["demo", "0001"], &["--verbosity=2"], &["-v", "2"], &["--"]] {
            assert_eq!(found("migrate", harmless), None, "{harmless:?}");
        }
    }

    #[test]
    fn command_specific_options_only_for_their_command() {
        assert_eq!(found("diffsettings", &["--default=evil"]), Some("--default=evil".into()));
        assert_eq!(found("migrate", &["--default=x"]), None);
        assert_eq!(found("test", &["--testrunner=x.Runner"]), Some("--testrunner=x.Runner".into()));
        assert_eq!(found("test", &["-bt", "/tmp"]), Some("-bt".into()));
        assert_eq!(found("test", &["-t/tmp"]), Some("-t/tmp".into()));
        assert_eq!(found("test", &["-k", "name"]), None);
        assert_eq!(found("migrate", &["-t"]), None);
    }

    #[test]
    fn the_hint_names_the_setting_where_the_policy_is_configured() {
        let in_toml = rejection("--settings=x", ConfiguredIn::DcToml).render("migrate");
        assert!(in_toml.contains("allow_code_loading_options = true in [policy] of dc.toml"), "{in_toml}");
        let in_settings = rejection("--settings=x", ConfiguredIn::DjangoSettings).render("migrate");
        assert!(in_settings.contains("DJANGOCOMMAND_ALLOW_CODE_LOADING_OPTIONS = True"), "{in_settings}");
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Any argument list (what the control plane's `args` split into).
        #[test]
        fn any_arguments_are_looked_at(
            command in "test|diffsettings|migrate|.{0,8}",
            args in proptest::collection::vec("-{0,2}[a-z=\\-]{0,12}|.{0,12}", 0..8),
        ) {
            let _ = find(&command, &args);
        }
    }
}
