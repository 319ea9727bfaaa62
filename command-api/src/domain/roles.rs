//! Roles and the scopes an access token carries for them.
//!
//! Every signed-in user has the scope [`USER_SCOPE`]; each role adds the scope
//! of the same name, so `admin` grants [`ADMIN_SCOPE`]. What a scope allows is
//! decided in one place, `http/auth.rs`.

use std::collections::BTreeSet;

/// The scope of every access token: acting on one's own account.
pub const USER_SCOPE: &str = "user";

/// The role, and scope, of administrators: status changes, unlocks, roles
/// and history of any user.
pub const ADMIN_SCOPE: &str = "admin";

/// The pattern of role names, as the API documents it.
pub const ROLE_PATTERN: &str = "^[a-z][a-z0-9_-]{0,31}$";

/// Whether `role` is a valid role name: a lower-case letter, then up to 31
/// lower-case letters, digits, `_` or `-`. Scopes are space-separated, so a
/// role name can never contain a space.
pub fn is_valid(role: &str) -> bool {
    let mut chars = role.chars();
    role.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The scopes of a user with `roles`, in a stable order.
pub fn scopes(roles: &BTreeSet<String>) -> Vec<String> {
    let mut scopes = vec![USER_SCOPE.to_owned()];
    scopes.extend(roles.iter().filter(|r| *r != USER_SCOPE).cloned());
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_short_lower_case_words() {
        for good in ["admin", "support", "a", "billing-reader", "team_2"] {
            assert!(is_valid(good), "{good}");
        }
        let long = "a".repeat(33);
        for bad in [
            "",
            "Admin",
            "2fa",
            "read write",
            "rôle",
            "-x",
            long.as_str(),
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn every_user_has_the_user_scope_and_one_scope_per_role() {
        let roles: BTreeSet<String> = ["support".into(), "admin".into()].into();
        assert_eq!(scopes(&roles), ["user", "admin", "support"]);
        assert_eq!(scopes(&BTreeSet::new()), ["user"]);
    }
}
