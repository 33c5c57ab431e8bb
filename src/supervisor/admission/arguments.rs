//! Argument rules (`[[policy.arguments]]`), beyond exact bound argument sets:
//! per command, options that are always refused, positional patterns that
//! are refused, (optionally) the only options allowed, with patterns their
//! values must match, and (optionally) a pattern every positional value must
//! match (e.g. fixture names but no paths for `loaddata`). Deny by default: with `allow_options`, an option
//! not listed is refused.
//!
//! The rules are checked against the arguments as the command's own parser
//! reads them (the worker builds the parser exactly as a job would, see
//! [`crate::worker::Worker::parse_args`]), so an abbreviation such as
//! `--datab=x` is `--database` here too and cannot slip past.

use regex::Regex;

use super::{Rejection, Rule};
use crate::ipc::GivenArg;

/// The rules of one command.
#[derive(Debug, Clone)]
pub struct ArgumentRules {
    /// Destinations (`database`) or option strings (`--database`).
    pub refuse_options: Vec<String>,
    /// Each matched element-wise against all the positional values; `*`
    /// matches any one value.
    pub refuse_positionals: Vec<Vec<String>>,
    /// `Some`: the only options allowed (deny by default).
    pub allow_options: Option<Vec<AllowedOption>>,
    /// `Some`: every positional value must match this pattern (the name is
    /// unused).
    pub allow_positionals: Option<AllowedOption>,
}

/// An option `allow_options` lets through.
#[derive(Debug, Clone)]
pub struct AllowedOption {
    /// A destination or an option string, as for `refuse_options`.
    pub name: String,
    /// As configured; empty for any value.
    pub pattern: String,
    /// `pattern` anchored at both ends; `None` for any value.
    regex: Option<Regex>,
}

impl AllowedOption {
    /// Fails with the regex crate's explanation if `pattern` is not a regex.
    pub fn new(name: &str, pattern: &str) -> Result<Self, regex::Error> {
        let regex = if pattern.is_empty() { None } else { Some(Regex::new(&format!("^(?:{pattern})$"))?) };
        Ok(Self { name: name.to_string(), pattern: pattern.to_string(), regex })
    }

    fn admits(&self, value: &str) -> bool {
        self.regex.as_ref().is_none_or(|regex| regex.is_match(value))
    }
}

/// Which rule an argument list breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Named in `refuse_options`.
    Refused { option: String, given_as: Option<String> },
    /// Not listed in `allow_options`.
    NotAllowed { option: String, given_as: Option<String> },
    /// Listed in `allow_options`, but this value does not match its pattern.
    BadValue { option: String, value: String, pattern: String },
    /// The positional values match a pattern of `refuse_positionals`.
    Positionals { values: Vec<String>, pattern: Vec<String> },
    /// A positional value does not match `allow_positionals`.
    Positional { value: String, pattern: String },
}

impl Violation {
    /// The `Reason:` of the refusal.
    pub fn reason(&self, command: &str) -> String {
        let given =
            |as_: &Option<String>| as_.as_ref().map(|a| format!(" (given as {a})")).unwrap_or_default();
        match self {
            Violation::Refused { option, given_as } => format!(
                "{} {option}{} is refused for '{command}' by [[policy.arguments]] refuse_options",
                if option.starts_with('-') { "option" } else { "argument" },
                given(given_as)
            ),
            Violation::NotAllowed { option, given_as } => format!(
                "option {option}{} is not in the allow_options of '{command}' in [[policy.arguments]] \
                 (options not listed there are refused)",
                given(given_as)
            ),
            Violation::BadValue { option, value, pattern } => format!(
                "value {value:?} of option {option} does not match {pattern:?}, the pattern allow_options \
                 of '{command}' in [[policy.arguments]] requires"
            ),
            Violation::Positionals { values, pattern } => format!(
                "positional arguments {values:?} match the pattern {pattern:?} refused for '{command}' \
                 by [[policy.arguments]] refuse_positionals"
            ),
            Violation::Positional { value, pattern } => format!(
                "positional argument {value:?} does not match {pattern:?}, the pattern allow_positionals \
                 of '{command}' in [[policy.arguments]] requires"
            ),
        }
    }
}

/// The rejection of an execution whose arguments the rules refused.
pub fn rejection(reason: String) -> Rejection {
    Rejection::new(
        Rule::ArgumentRules,
        reason,
        "Arguments are read the way the command's own parser reads them and checked against \
         the [[policy.arguments]] rules in dc.toml.\n",
    )
}

impl ArgumentRules {
    /// Checks what the command's parser made of `args` (`given`); `args`
    /// only serves to say how an option was spelled.
    pub fn check(&self, args: &[String], given: &[GivenArg]) -> Result<(), Violation> {
        for arg in given {
            if self.refuse_options.iter().any(|name| names(arg, name)) {
                return Err(Violation::Refused { option: display(arg), given_as: given_as(arg, args) });
            }
        }
        if let Some(allowed) = &self.allow_options {
            for arg in given.iter().filter(|arg| !arg.flags.is_empty()) {
                let Some(rule) = allowed.iter().find(|rule| names(arg, &rule.name)) else {
                    return Err(Violation::NotAllowed {
                        option: display(arg),
                        given_as: given_as(arg, args),
                    });
                };
                if let Some(value) = arg.values.iter().find(|value| !rule.admits(value)) {
                    return Err(Violation::BadValue {
                        option: display(arg),
                        value: value.clone(),
                        pattern: rule.pattern.clone(),
                    });
                }
            }
        }
        let positionals: Vec<String> =
            given.iter().filter(|arg| arg.flags.is_empty()).flat_map(|arg| arg.values.clone()).collect();
        if let Some(allowed) = &self.allow_positionals {
            if let Some(value) = positionals.iter().find(|value| !allowed.admits(value)) {
                return Err(Violation::Positional { value: value.clone(), pattern: allowed.pattern.clone() });
            }
        }
        for pattern in &self.refuse_positionals {
            let matches = pattern.len() == positionals.len()
                && pattern.iter().zip(&positionals).all(|(want, value)| want == "*" || want == value);
            if matches {
                return Err(Violation::Positionals { values: positionals, pattern: pattern.clone() });
            }
        }
        Ok(())
    }
}

/// Whether a configured name (a destination or an option string) names `arg`.
fn names(arg: &GivenArg, name: &str) -> bool {
    arg.dest == name || arg.flags.iter().any(|flag| flag == name)
}

/// The option's long form (`--verbosity` rather than `-v`), or its destination.
fn display(arg: &GivenArg) -> String {
    arg.flags
        .iter()
        .find(|flag| flag.starts_with("--"))
        .or(arg.flags.first())
        .cloned()
        .unwrap_or_else(|| arg.dest.clone())
}

/// The abbreviation `args` used for the option, if it was not spelled in full.
fn given_as(arg: &GivenArg, args: &[String]) -> Option<String> {
    args.iter()
        .take_while(|a| *a != "--")
        .filter_map(|a| a.split('=').next())
        .filter(|name| name.len() > 2 && name.starts_with("--"))
        .find(|name| {
            arg.flags.iter().any(|flag| flag.starts_with(*name)) && !arg.flags.iter().any(|flag| flag == name)
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(dest: &str, flags: &[&str], values: &[&str]) -> GivenArg {
        GivenArg {
            dest: dest.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn positional(dest: &str, value: &str) -> GivenArg {
        option(dest, &[], &[value])
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn rules(refuse: &[&str], positionals: &[&[&str]], allow: Option<&[(&str, &str)]>) -> ArgumentRules {
        ArgumentRules {
            refuse_options: strings(refuse),
            refuse_positionals: positionals.iter().map(|p| strings(p)).collect(),
            allow_options: allow.map(|list| {
                list.iter().map(|(name, pattern)| AllowedOption::new(name, pattern).unwrap()).collect()
            }),
            allow_positionals: None,
        }
    }

    #[test]
    fn refused_options_match_destination_or_flag_and_name_the_abbreviation() {
        let database = option("database", &["--database"], &["other"]);
        let args = strings(&["--datab=other"]);
        for name in ["database", "--database"] {
            let violation = rules(&[name], &[], None).check(&args, std::slice::from_ref(&database));
            assert_eq!(
                violation,
                Err(Violation::Refused { option: "--database".into(), given_as: Some("--datab".into()) })
            );
        }
        let spelled_out = strings(&["--database", "other"]);
        assert_eq!(
            rules(&["database"], &[], None).check(&spelled_out, std::slice::from_ref(&database)),
            Err(Violation::Refused { option: "--database".into(), given_as: None })
        );
        let plan = option("plan", &["--plan"], &[]);
        assert_eq!(rules(&["database"], &[], None).check(&strings(&["--plan"]), &[plan]), Ok(()));
        let reason = Violation::Refused { option: "--database".into(), given_as: Some("--datab".into()) }
            .reason("migrate");
        assert_eq!(
            reason,
            "option --database (given as --datab) is refused for 'migrate' by [[policy.arguments]] refuse_options"
        );
    }

    #[test]
    fn positional_patterns_match_the_whole_list_with_wildcards() {
        let rules = rules(&[], &[&["*", "zero"]], None);
        let demo_zero = [positional("app_label", "demo"), positional("migration_name", "zero")];
        assert_eq!(
            rules.check(&[], &demo_zero),
            Err(Violation::Positionals {
                values: strings(&["demo", "zero"]),
                pattern: strings(&["*", "zero"])
            })
        );
        let demo_0001 = [positional("app_label", "demo"), positional("migration_name", "0001")];
        assert_eq!(rules.check(&[], &demo_0001), Ok(()));
        // The whole list must match: neither shorter nor longer lists do.
        assert_eq!(rules.check(&[], &[positional("app_label", "zero")]), Ok(()));
        assert_eq!(rules.check(&[], &[]), Ok(()));
        // Options between positionals do not count.
        let mixed = [positional("app_label", "demo"), option("plan", &["--plan"], &[]), demo_zero[1].clone()];
        assert!(rules.check(&[], &mixed).is_err());
    }

    #[test]
    fn allow_options_denies_unlisted_options_and_checks_whole_values() {
        let rules = rules(&[], &[], Some(&[("lines", "[0-9]{1,3}"), ("--plan", "")]));
        let lines = |value: &str| option("lines", &["--lines"], &[value]);
        assert_eq!(rules.check(&[], &[lines("5")]), Ok(()));
        assert_eq!(
            rules.check(&[], &[lines("5000")]),
            Err(Violation::BadValue {
                option: "--lines".into(),
                value: "5000".into(),
                pattern: "[0-9]{1,3}".into()
            })
        );
        // Anchored: a matching part of the value is not enough.
        assert!(rules.check(&[], &[lines("5x")]).is_err());
        assert_eq!(rules.check(&[], &[option("plan", &["--plan"], &[])]), Ok(()));
        assert_eq!(
            rules.check(&strings(&["--fl"]), &[option("flush", &["--flush"], &[])]),
            Err(Violation::NotAllowed { option: "--flush".into(), given_as: Some("--fl".into()) })
        );
        // Positionals are not options: refuse_positionals governs them.
        assert_eq!(rules.check(&[], &[positional("app_label", "demo")]), Ok(()));
        // Every value of a repeated or multi-valued option is checked.
        let many = option("lines", &["--lines"], &["1", "9999"]);
        assert!(rules.check(&[], &[many]).is_err());
    }

    #[test]
    fn allow_positionals_checks_every_positional_value() {
        let mut rules = rules(&[], &[], None);
        rules.allow_positionals = Some(AllowedOption::new("", "[A-Za-z0-9_-]+(\\.[A-Za-z0-9]+)*").unwrap());
        let fixtures = [positional("args", "users"), positional("args", "groups.json")];
        assert_eq!(rules.check(&[], &fixtures), Ok(()));
        let path = [positional("args", "users"), positional("args", "/etc/passwd.json")];
        assert_eq!(
            rules.check(&[], &path),
            Err(Violation::Positional {
                value: "/etc/passwd.json".into(),
                pattern: "[A-Za-z0-9_-]+(\\.[A-Za-z0-9]+)*".into()
            })
        );
        // Option values are not positionals.
        assert_eq!(rules.check(&[], &[option("database", &["--database"], &["/x"])]), Ok(()));
    }

    #[test]
    fn a_bad_pattern_is_an_error() {
        assert!(AllowedOption::new("lines", "[0-9").is_err());
        assert!(AllowedOption::new("lines", "").unwrap().admits("anything at all"));
    }

    #[test]
    fn display_prefers_the_long_flag() {
        assert_eq!(display(&option("verbosity", &["-v", "--verbosity"], &["2"])), "--verbosity");
        assert_eq!(display(&option("x", &["-x"], &[])), "-x");
        assert_eq!(display(&positional("app_label", "demo")), "app_label");
    }

    fn given_arg() -> impl proptest::strategy::Strategy<Value = GivenArg> {
        use proptest::prelude::*;
        let name = "-{0,2}[a-z]{0,6}|.{0,6}";
        (name, prop::collection::vec(name, 0..3), prop::collection::vec(".{0,8}", 0..3))
            .prop_map(|(dest, flags, values)| GivenArg { dest, flags, values })
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        /// Whatever the worker's parser reports (a compromised worker may
        /// report anything) and whatever was given, the rules answer.
        #[test]
        fn any_parsed_arguments_are_judged(
            args in proptest::collection::vec("-{0,2}[a-z=]{0,10}|.{0,10}", 0..6),
            given in proptest::collection::vec(given_arg(), 0..6),
            refuse in proptest::collection::vec("-{0,2}[a-z]{1,6}", 0..3),
            positionals in proptest::collection::vec(proptest::collection::vec("\\*|[a-z]{0,3}", 0..3), 0..3),
        ) {
            let mut rules = rules(&[], &[], Some(&[("lines", "[0-9]{1,3}"), ("--plan", "")]));
            rules.refuse_options = refuse;
            rules.refuse_positionals = positionals;
            rules.allow_positionals = Some(AllowedOption::new("", "[a-z]+").unwrap());
            if let Err(violation) = rules.check(&args, &given) {
                let _ = violation.reason("migrate");
            }
        }
    }
}
