/** @lifeboat/vault: public API. */
export {};
