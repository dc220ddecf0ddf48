// The `env` import module of the test .wasm under Node. wasm32-unknown-unknown links the
// proxy-wasm host glue (src/host/) too, so the module imports Envoy's `proxy_*` hostcalls;
// the pure-core tests never call them. Every import is a stub that fails loudly if one does.
"use strict";
module.exports = new Proxy(
  {},
  {
    get(_target, name) {
      if (typeof name !== "string" || name === "then" || name === "__esModule") {
        return undefined;
      }
      return () => {
        throw new Error(`hostcall env.${name} called from a wasm unit test`);
      };
    },
  },
);
