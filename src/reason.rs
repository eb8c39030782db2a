//! Every reason the house gives, in one enum: condition and event reasons, the `reason` label of
//! `datastore_reconcile_failures_total`, and the `reason` of the CLI's JSON errors. The variant's
//! name is the reason (CamelCase, as Kubernetes reasons are), so the set is bounded: a metric
//! label cannot grow without limit, and `grep` finds where each is given.

/// Declares [`Reason`] with [`Reason::as_str`] returning each variant's name.
macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &[Reason] = &[$(Reason::$name,)*];

            /// The reason as Kubernetes and the JSON output show it: the variant's name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // What went wrong with storage or local files (the kinds of the `error` module's `Error`).
    InvalidConfig,
    AuthFailed,
    NotFound,
    Unreachable,
    IntegrityError,
    UnsafeBlobName,
    StorageError,
    LocalIoError,
    LocalUnwritable,
    PartialFailure,

    // What the planner refuses (the `plan` module's `PlanError`, variant for variant).
    EmptyParameterName,
    DuplicateParameter,
    ValueAndDataReference,
    NoValueOrDataReference,
    EmptyCommand,
    EmptyEntryScript,
    EntryScriptOutsideSource,
    MissingImage,
    InvalidDatastorePath,
    InvalidEnvName,
    InvalidEnvValue,
    UnknownDatastore,
    MountOnLocalCompute,
    OverwriteNotUpload,
    MountOptionNotMount,
    EnvShadowsReference,
    LocalDatastoreOnCluster,
    AzureFileOnLocalCompute,
    WriteToReadOnlyDatastore,
    SidecarOnAzureFile,
    SourceDirectoryOutsideCode,
    InvalidPathOnCompute,
    PathOnComputeClash,
    EnvVarClash,
    InvalidDatastoreName,
    ArgumentTooLong,
    CommandLineTooLong,

    // Why a mount cannot be mounted in this cluster (the `render` module's `MountRefusal`).
    CsiCannotMount,
    CsiDriverMissing,
    PrivilegedForbidden,
    MountNeedsCredentials,
    NoBlobfuseImage,

    // An Experiment's `Accepted` condition.
    /// The spec is valid and every datastore usable.
    Accepted,
    NameTooLong,
    /// A Job of the run's name exists and is not this Experiment's.
    NameConflict,
    DatastoreNotFound,
    DatastoreNotAllowed,
    DatastoreInvalid,
    QuotaExceeded,
    Forbidden,
    /// The apiserver refused a built object as invalid (400 or 422).
    InvalidJob,
    LocalComputeTarget,

    // An Experiment's `Succeeded` condition: where the run is, and how it ended.
    Created,
    Downloading,
    Running,
    Uploading,
    /// The outputs are uploaded; the finished pods and the outputs volume are being removed.
    OutputsUploaded,
    OutputsSkipped,
    Succeeded,
    RunFailed,
    UploadFailed,
    StartTimeout,
    RunJobDeleted,

    // A Datastore's `Ready` condition (failures use the storage kinds above).
    Reachable,
    /// An Azure Files share: its credentials resolved; the CSI driver reaches the share.
    CredentialsResolved,
    LocalOnly,
    ContainerNotFound,

    // Why a reconcile failed and is retried: the apiserver's `StatusReason`, prefixed.
    KubeBadRequest,
    KubeUnauthorized,
    KubeForbidden,
    KubeNotFound,
    KubeAlreadyExists,
    KubeConflict,
    KubeGone,
    KubeInvalid,
    KubeServerTimeout,
    KubeTimeout,
    KubeTooManyRequests,
    KubeMethodNotAllowed,
    KubeNotAcceptable,
    KubeRequestEntityTooLarge,
    KubeUnsupportedMediaType,
    KubeInternalError,
    KubeExpired,
    KubeServiceUnavailable,
    /// An apiserver answer with a reason not listed above (or none).
    KubeOther,
    /// An answer that could not be decoded.
    KubeDecode,
    /// No answer: the request itself failed (connection, TLS, timeout).
    KubeRequest,
}

impl Reason {
    /// The reason of an apiserver's `Status.reason`, as `Kube<reason>`; [`Reason::KubeOther`]
    /// for one this list does not know.
    pub fn kube(status_reason: &str) -> Reason {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str().strip_prefix("Kube") == Some(status_reason))
            .filter(|r| {
                !matches!(
                    r,
                    Reason::KubeOther | Reason::KubeDecode | Reason::KubeRequest
                )
            })
            .unwrap_or(Reason::KubeOther)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_camel_case_words() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in Reason::ALL {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} is declared twice");
            assert!(
                name.starts_with(|c: char| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}"
            );
        }
    }

    #[test]
    fn apiserver_reasons_map_to_their_own_label_and_others_to_one() {
        assert_eq!(Reason::kube("Conflict"), Reason::KubeConflict);
        assert_eq!(Reason::kube("Forbidden"), Reason::KubeForbidden);
        assert_eq!(Reason::kube(""), Reason::KubeOther);
        assert_eq!(Reason::kube("we\"ird {label}\n"), Reason::KubeOther);
        // Only the apiserver's reasons: not the ones we give when there is no answer.
        assert_eq!(Reason::kube("Request"), Reason::KubeOther);
        assert_eq!(Reason::kube("Other"), Reason::KubeOther);
    }
}
