/** @lifeboat/integration-tests: public API. */
export {};
