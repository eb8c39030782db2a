//! The operator image's layout (the Dockerfile) and the objects the controller renders agree:
//! the agent containers run the binary where the image has it, as the user the image runs as.

mod common;

use datastore_operator::render::{IMAGE_BINARY, RUN_AS_USER};

#[test]
fn agent_containers_run_the_binary_where_the_image_has_it() {
    assert_eq!(
        common::image::binary_path(),
        IMAGE_BINARY,
        "the Dockerfile copies the binary elsewhere than render::IMAGE_BINARY, which every agent container runs"
    );
    assert_eq!(common::image::entrypoint(), [IMAGE_BINARY]);
    assert!(
        IMAGE_BINARY.starts_with('/'),
        "distroless has no PATH to find a bare name on"
    );
}

#[test]
fn the_image_runs_as_the_user_the_pods_run_as() {
    assert_eq!(
        common::image::user(),
        format!("{RUN_AS_USER}:{RUN_AS_USER}")
    );
}
