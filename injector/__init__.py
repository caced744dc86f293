"""Injector: sidecar injection and the admission webhooks, a pure core in a thin server.

- `inject`: `decide` (is the pod enrolled?) and `inject(pod, settings, namespace_labels)`, pure;
  `containers`, `probes`, `annotations` build its parts; `settings`: `InjectSettings`.
- `patch`: the JSONPatch between the pod before and after; `validate`: the validation verdict.
- `webhook`: AdmissionReview v1 handlers (`/inject`, `/validate`); `app` and `tls`: the HTTPS
  server on 15017 with a certificate from the mesh CA.
- `redirect`, `redirect_cmd`: the init container's traffic capture rules and command.
"""
