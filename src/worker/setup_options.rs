//! Which job arguments ask Django for another set-up than the preloaded
//! worker's: `--settings` naming another module, or `--pythonpath`. Such a
//! job must not run in the worker (it would silently run on the worker's
//! settings); the worker runs it as a fresh `manage.py`, and the worker's child
//! refuses it as a last line of defence.
//!
//! The check reads the arguments as text and errs on the safe side: argparse
//! accepts any unambiguous prefix of an option (`--sett=x`), so every prefix
//! counts, whatever else the command accepts.

/// The options Django's `handle_default_options` acts on.
const SETUP_OPTIONS: [&str; 2] = ["settings", "pythonpath"];

/// The first argument that asks for another set-up than `settings_module`,
/// as written (`--settings=other`), or `None` when the worker's set-up is right.
pub fn other_setup_asked(args: &[String], settings_module: &str) -> Option<String> {
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            return None;
        }
        let Some(option) = arg.strip_prefix("--") else { continue };
        let (name, inline_value) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (option, None),
        };
        let Some(full) = SETUP_OPTIONS.iter().find(|full| !name.is_empty() && full.starts_with(name)) else {
            continue;
        };
        let value = inline_value.or_else(|| rest.next().cloned()).unwrap_or_default();
        if *full == "settings" && value == settings_module {
            continue;
        }
        return Some(match arg.contains('=') {
            true => arg.clone(),
            false => format!("{arg} {value}"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(args: &[&str]) -> Option<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        other_setup_asked(&args, "site.settings")
    }

    #[test]
    fn other_settings_and_any_pythonpath_are_caught_in_every_spelling() {
        assert_eq!(asked(&["app", "zero", "--settings=site.alt"]).as_deref(), Some("--settings=site.alt"));
        assert_eq!(asked(&["--settings", "site.alt"]).as_deref(), Some("--settings site.alt"));
        assert_eq!(asked(&["--sett=site.alt"]).as_deref(), Some("--sett=site.alt"));
        assert_eq!(asked(&["--pythonpath", "/tmp"]).as_deref(), Some("--pythonpath /tmp"));
        assert_eq!(asked(&["--py=/tmp"]).as_deref(), Some("--py=/tmp"));
        assert_eq!(asked(&["--settings"]).as_deref(), Some("--settings "));
    }

    #[test]
    fn the_workers_own_settings_and_other_options_are_fine() {
        assert_eq!(asked(&["--settings=site.settings", "-v", "2"]), None);
        assert_eq!(asked(&["--plan", "--skip-checks", "--"]), None);
        assert_eq!(asked(&["--", "--settings=site.alt"]), None);
        assert_eq!(asked(&["-settings=x", "--=x"]), None);
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        #[test]
        fn any_arguments_are_looked_at(
            args in proptest::collection::vec("-{0,2}[a-z=.]{0,12}|.{0,12}", 0..8),
        ) {
            let _ = other_setup_asked(&args, "site.settings");
        }
    }
}
