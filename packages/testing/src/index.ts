/** @lifeboat/testing: public API. */
export {};
