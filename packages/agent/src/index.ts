/** @lifeboat/agent: public API. */
export {};
