//! librdkafka settings from the environment, shared by every Kafka client
//! (the relay's producer and admin client, the projector's consumer), so
//! security (TLS, SASL) and tuning are configured once, the same way.
//!
//! * `KAFKA_CONFIG_<NAME>=<value>` sets librdkafka property `<name>`, the
//!   name lower-cased with `_` read as `.`: `KAFKA_CONFIG_CLIENT_RACK=eu-1`
//!   sets `client.rack`.
//! * Shorthands for the common security settings:
//!   [`SHORTHANDS`] (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_USERNAME`, …).
//!
//! librdkafka itself checks names and values when a client is created, so a
//! misspelt property or an invalid value stops the service at start-up with
//! librdkafka's own message. A service's own settings (the relay's delivery
//! guarantees, the projector's offset handling) are applied after these and
//! win; [`KafkaClientSettings::apply`] warns when one overrides a variable.

use std::fmt;

use rdkafka::ClientConfig;

use crate::config::InvalidSetting;

/// The generic prefix: `KAFKA_CONFIG_SASL_MECHANISMS` → `sasl.mechanisms`.
pub const PREFIX: &str = "KAFKA_CONFIG_";

/// Variables kept as short names for the usual security settings.
pub const SHORTHANDS: &[(&str, &str)] = &[
    ("KAFKA_SECURITY_PROTOCOL", "security.protocol"),
    ("KAFKA_SASL_MECHANISM", "sasl.mechanism"),
    ("KAFKA_SASL_USERNAME", "sasl.username"),
    ("KAFKA_SASL_PASSWORD", "sasl.password"),
    ("KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
    ("KAFKA_SSL_CERTIFICATE_LOCATION", "ssl.certificate.location"),
    ("KAFKA_SSL_KEY_LOCATION", "ssl.key.location"),
    ("KAFKA_SSL_KEY_PASSWORD", "ssl.key.password"),
];

/// librdkafka properties passed through from the environment. Its `Debug`
/// hides the value of every property that may hold a secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaClientSettings {
    properties: Vec<(String, String)>,
}

impl KafkaClientSettings {
    /// Reads `KAFKA_CONFIG_*` and the [`SHORTHANDS`] from the environment.
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Self::from_vars(std::env::vars())
    }

    /// The same from any list of variables (tests pass their own).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, InvalidSetting> {
        let mut properties: Vec<(String, String, &'static str)> = Vec::new();
        for (name, value) in vars {
            if value.trim().is_empty() {
                continue;
            }
            let (variable, property) = if let Some(rest) = name.strip_prefix(PREFIX) {
                if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(InvalidSetting {
                        name: "KAFKA_CONFIG_*",
                        value: name,
                        reason: "names a librdkafka property as KAFKA_CONFIG_<NAME>, letters, digits and _ only".into(),
                    });
                }
                (
                    "KAFKA_CONFIG_*",
                    rest.to_ascii_lowercase().replace('_', "."),
                )
            } else if let Some((variable, property)) =
                SHORTHANDS.iter().find(|(variable, _)| *variable == name)
            {
                (*variable, (*property).to_owned())
            } else {
                continue;
            };
            if properties.iter().any(|(p, _, _)| *p == property) {
                return Err(InvalidSetting {
                    name: variable,
                    value: name,
                    reason: format!("{property} is set by two variables"),
                });
            }
            properties.push((property, value, variable));
        }
        properties.sort();
        Ok(Self {
            properties: properties.into_iter().map(|(p, v, _)| (p, v)).collect(),
        })
    }

    /// The properties, sorted by name.
    pub fn properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// A client configuration with these properties, for a service to add
    /// its own settings to: they come after, so they win.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in self.properties() {
            config.set(name, value);
        }
        config
    }

    /// Sets `name` to `value` on `config` (a service's own setting), warning
    /// when that overrides a property given in the environment.
    pub fn set_own(&self, config: &mut ClientConfig, name: &str, value: impl Into<String>) {
        let value = value.into();
        if self
            .properties
            .iter()
            .any(|(p, v)| p == name && *v != value)
        {
            tracing::warn!(
                property = name,
                "a KAFKA_* variable sets a property the service fixes itself; it is ignored"
            );
        }
        config.set(name, value);
    }

    /// Sets every property of `own` with [`Self::set_own`].
    pub fn apply(&self, config: &mut ClientConfig, own: &[(&str, String)]) {
        for (name, value) in own {
            self.set_own(config, name, value.clone());
        }
    }
}

/// [`KafkaClientSettings::from_env`] as a client configuration, for a caller
/// that cannot return a settings error itself: an invalid variable becomes a
/// property librdkafka does not know, named after the variable, so creating
/// the client fails at start-up with a message that points at it.
pub fn client_config_from_env() -> ClientConfig {
    match KafkaClientSettings::from_env() {
        Ok(settings) => settings.client_config(),
        Err(error) => {
            let mut config = ClientConfig::new();
            config.set(
                format!("invalid.environment.variable.{}", error.name),
                error.to_string(),
            );
            config
        }
    }
}

/// True for properties whose value must never be printed.
pub fn is_secret(property: &str) -> bool {
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|word| property.contains(word))
        && !property.ends_with(".location")
}

impl fmt::Debug for KafkaClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.properties().map(|(name, value)| {
                    (name, if is_secret(name) { "<redacted>" } else { value })
                }),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn generic_variables_name_librdkafka_properties() {
        let settings = KafkaClientSettings::from_vars(vars(&[
            ("KAFKA_CONFIG_CLIENT_RACK", "rack-7"),
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_BROKERS", "not-a-property:9092"),
            ("PATH", "/bin"),
            ("KAFKA_CONFIG_LINGER_MS", " "),
        ]))
        .unwrap();
        assert_eq!(
            settings.properties().collect::<Vec<_>>(),
            [("client.rack", "rack-7"), ("security.protocol", "sasl_ssl")]
        );
    }

    #[test]
    fn a_property_set_twice_or_a_strange_name_is_refused() {
        let twice = KafkaClientSettings::from_vars(vars(&[
            ("KAFKA_SASL_USERNAME", "a"),
            ("KAFKA_CONFIG_SASL_USERNAME", "b"),
        ]));
        assert!(twice.unwrap_err().to_string().contains("sasl.username"));
        assert!(KafkaClientSettings::from_vars(vars(&[("KAFKA_CONFIG_A-B", "x")])).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let settings = KafkaClientSettings::from_vars(vars(&[
            ("KAFKA_SASL_PASSWORD", "hunter2-very-secret"),
            ("KAFKA_SSL_KEY_PASSWORD", "another-secret"),
            (
                "KAFKA_CONFIG_SASL_OAUTHBEARER_CLIENT_SECRET",
                "third-secret",
            ),
            ("KAFKA_SSL_CA_LOCATION", "/etc/ca.pem"),
        ]))
        .unwrap();
        let shown = format!("{settings:?}");
        for secret in ["hunter2-very-secret", "another-secret", "third-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("/etc/ca.pem"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
    }

    #[test]
    fn the_service_settings_win() {
        let settings = KafkaClientSettings::from_vars(vars(&[("KAFKA_CONFIG_ACKS", "1")])).unwrap();
        let mut config = settings.client_config();
        settings.apply(&mut config, &[("acks", "all".to_owned())]);
        assert_eq!(config.get("acks"), Some("all"));
    }
}
