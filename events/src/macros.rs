//! The boilerplate every event family shares: the `Event` impls and the enum that
//! dispatches over the family's event types.

/// Declares an event family: `event_family!(UserEvent, "users" { Registered(UserRegistered, 1), ... })`
/// implements [`crate::Event`] for each type (with its `.avsc` and schema version) and
/// defines the enum with `metadata`, `full_name`, `encode` and `from_avro`.
macro_rules! event_family {
    ($(#[$doc:meta])* $family:ident, $dir:literal, $namespace:literal { $($variant:ident($ty:ident, $version:literal)),+ $(,)? }) => {
        $(
            impl $crate::Event for $ty {
                const FULL_NAME: &'static str = concat!($namespace, ".", stringify!($ty));
                const SCHEMA: &'static str = include_str!(concat!("../../avro/", $dir, "/", stringify!($ty), ".avsc"));
                const SCHEMA_VERSION: i32 = $version;
                fn metadata(&self) -> &$crate::EventMetadata {
                    &self.metadata
                }
            }
        )+

        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum $family {
            $($variant($ty),)+
        }

        impl $family {
            /// `(full name, .avsc text)` of every event type of the family.
            pub const SCHEMAS: &'static [(&'static str, &'static str)] =
                &[$((<$ty as $crate::Event>::FULL_NAME, <$ty as $crate::Event>::SCHEMA),)+];

            /// The event's metadata, whatever its type.
            pub fn metadata(&self) -> &$crate::EventMetadata {
                match self {
                    $($family::$variant(e) => &e.metadata,)+
                }
            }

            /// The Avro full name of the event's type.
            pub fn full_name(&self) -> &'static str {
                match self {
                    $($family::$variant(_) => <$ty as $crate::Event>::FULL_NAME,)+
                }
            }

            /// The event with `metadata.schema_version` set to its type's current version.
            pub fn with_schema_version(mut self) -> Self {
                match &mut self {
                    $($family::$variant(e) => e.metadata.schema_version = <$ty as $crate::Event>::SCHEMA_VERSION,)+
                }
                self
            }

            /// Encodes the event framed with the schema id `id_of` gives for its type.
            pub fn encode(
                &self,
                id_of: impl Fn(&str) -> Option<u32>,
            ) -> Result<Vec<u8>, $crate::wire::WireError> {
                match self {
                    $($family::$variant(e) => $crate::wire::encode_event(e, id_of),)+
                }
            }

            /// Builds the event from a decoded Avro value whose record full name is `name`.
            pub fn from_avro(
                name: &str,
                value: apache_avro::types::Value,
            ) -> Result<Self, $crate::schemas::EventDecodeError> {
                $(
                    if name == <$ty as $crate::Event>::FULL_NAME {
                        return $crate::schemas::decode_as(value).map($family::$variant);
                    }
                )+
                Err($crate::schemas::EventDecodeError::UnknownType(name.to_owned()))
            }
        }
    };
}

pub(crate) use event_family;
