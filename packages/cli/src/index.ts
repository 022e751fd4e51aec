/** @lifeboat/cli: public API. */
export {};
